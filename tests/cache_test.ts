import { defaultCacheDir, LayerCache, type LayerKeyInput } from "../lib/cache.ts";
import type { LayerResult } from "../lib/oci.ts";
import { planLayers } from "../lib/plan.ts";
import { assert, assertEquals, assertNotEquals } from "./support/assert.ts";
import { withTempDir } from "./support/cli.ts";

const [PLAN, OTHER_PLAN] = planLayers({ sizes: [1024, 1024], seed: 1 });
const INPUT: LayerKeyInput = {
  plan: PLAN,
  seed: 1,
  entropy: 100,
  compression: "gzip",
  level: undefined,
};
const RESULT: LayerResult = {
  descriptor: {
    mediaType: "application/vnd.oci.image.layer.v1.tar+gzip",
    digest: `sha256:${"a".repeat(64)}`,
    size: 1234,
  },
  diffId: `sha256:${"b".repeat(64)}`,
  tarSize: 3072,
  fileBytes: 1024,
  fileCount: 1,
};

Deno.test("LayerCache.key() changes with every input that changes a layer's bytes", async (t) => {
  const cache = new LayerCache({ dir: "/unused", salt: "imgmkr 1, deno 2" });
  const base = cache.key(INPUT);
  const changes: [string, LayerKeyInput | LayerCache][] = [
    ["the seed", { ...INPUT, seed: 2 }],
    ["the entropy", { ...INPUT, entropy: 50 }],
    ["the compression", { ...INPUT, compression: "zstd" }],
    ["the level", { ...INPUT, level: 9 }],
    ["the plan", { ...INPUT, plan: OTHER_PLAN }],
    ["the salt (versions)", new LayerCache({ dir: "/unused", salt: "imgmkr 1, deno 3" })],
  ];
  for (const [name, change] of changes) {
    await t.step(name, () => {
      const key = change instanceof LayerCache ? change.key(INPUT) : cache.key(change);
      assertNotEquals(key, base);
    });
  }
  await t.step(
    "the same input gives the same key",
    () => assertEquals(cache.key({ ...INPUT }), base),
  );
});

Deno.test("LayerCache keeps what put() stored, and treats anything unreadable as a miss", async (t) => {
  await withTempDir(async (dir) => {
    const cache = new LayerCache({ dir: `${dir}/layers`, salt: "s" });
    await t.step(
      "a miss before put()",
      async () => assertEquals(await cache.get(INPUT), undefined),
    );
    await t.step("a hit after put(), with no temp file left", async () => {
      await cache.put(INPUT, RESULT);
      assertEquals(await cache.get(INPUT), RESULT);
      assertEquals([...Deno.readDirSync(`${dir}/layers`)].map((e) => e.name), [
        `${cache.key(INPUT)}.json`,
      ]);
    });
    await t.step("a corrupt or malformed entry is a miss", async () => {
      const path = `${dir}/layers/${cache.key(INPUT)}.json`;
      for (const text of ["{not json", JSON.stringify({ ...RESULT, diffId: "sha256:xyz" })]) {
        await Deno.writeTextFile(path, text);
        assertEquals(await cache.get(INPUT), undefined, text);
      }
    });
    await t.step("put() into an unwritable place does not throw", async () => {
      await Deno.writeTextFile(`${dir}/file`, "");
      await new LayerCache({ dir: `${dir}/file/layers`, salt: "s" }).put(INPUT, RESULT);
    });
  });
});

Deno.test("defaultCacheDir() follows XDG_CACHE_HOME, then HOME", () => {
  const env = (vars: Record<string, string>) => (name: string) => vars[name];
  assertEquals(defaultCacheDir(env({ XDG_CACHE_HOME: "/x", HOME: "/h" })), "/x/imgmkr/layers");
  assertEquals(defaultCacheDir(env({ HOME: "/h" })), "/h/.cache/imgmkr/layers");
  assert(defaultCacheDir(env({})) === undefined);
});
