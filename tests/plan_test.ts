import { assert, assertEquals, assertNotEquals, assertThrows } from "./support/assert.ts";
import { defaultFileCount, MAX_MOCK_FILE_SIZE, planLayers } from "../lib/plan.ts";

const GB = 1024 ** 3;
const MB = 1024 ** 2;

Deno.test("planLayers() puts one file of exactly the size in layerN by default", () => {
  const plans = planLayers({ sizes: [GB, 512 * MB, 10 * 1024], seed: 7 });
  assertEquals(plans.map((p) => p.files.map((f) => [f.path, f.size])), [
    [["layer1/1.00GB-file", GB]],
    [["layer2/512.00MB-file", 512 * MB]],
    [["layer3/10.00KB-file", 10240]],
  ]);
  assertEquals(plans.map((p) => p.dirs), [["layer1"], ["layer2"], ["layer3"]]);
  assertEquals(new Set(plans.map((p) => p.files[0].key)).size, 3, "content keys are distinct");
});

Deno.test("planLayers() with mockFs sums exactly, names uniquely and never makes empty files", async (t) => {
  const cases: [string, number, number | undefined][] = [
    ["exactly 1 GB", GB, undefined],
    ["1 byte over a power of two", GB + 1, undefined],
    ["10 MB with 1000 files", 10 * MB, 1000],
    ["20 GB", 20 * GB, undefined],
    ["20 GB in 5 files (above the 512 MB cap)", 20 * GB, 5],
    ["7 bytes in 7 files", 7, 7],
    ["1 byte, default count", 1, undefined],
    ["100 KB with 3 files", 100 * 1024, 3],
  ];
  for (const [name, size, targetFiles] of cases) {
    await t.step(name, () => {
      const [plan] = planLayers({ sizes: [size], seed: 42, mockFs: true, targetFiles });
      const sum = plan.files.reduce((s, f) => s + f.size, 0);
      assertEquals(sum, size, "sizes sum to the layer size");
      assertEquals(plan.files.length, targetFiles ?? defaultFileCount(size));
      assert(
        plan.files.every((f) => f.size >= 1 && Number.isInteger(f.size)),
        "no empty or fractional file",
      );
      assertEquals(
        new Set(plan.files.map((f) => f.path)).size,
        plan.files.length,
        "paths are unique",
      );
      const cap = Math.max(MAX_MOCK_FILE_SIZE, Math.ceil(size / plan.files.length));
      assert(plan.files.every((f) => f.size <= cap), "no file above the cap");
      const dirs = new Set(plan.dirs);
      for (const f of plan.files) {
        const parent = f.path.slice(0, f.path.lastIndexOf("/"));
        assert(dirs.has(parent), `parent ${parent} of ${f.path} is planned`);
      }
    });
  }
});

Deno.test("planLayers() with mockFs respects --max-depth and sorts paths", async (t) => {
  for (const maxDepth of [0, 1, 3, 6]) {
    await t.step(`max depth ${maxDepth}`, () => {
      const [plan] = planLayers({
        sizes: [50 * MB],
        seed: 1,
        mockFs: true,
        targetFiles: 400,
        maxDepth,
      });
      const depths = plan.files.map((f) => f.path.split("/").length - 2);
      assert(Math.max(...depths) <= maxDepth, `deepest file at ${Math.max(...depths)}`);
      if (maxDepth > 0) assert(Math.max(...depths) >= 1, "uses subdirectories");
      const paths = plan.files.map((f) => f.path);
      assertEquals(paths, [...paths].sort());
      assertEquals(plan.dirs, [...plan.dirs].sort());
    });
  }
});

Deno.test("planLayers() with mockFs is skewed like a rootfs: mostly small files", () => {
  const [plan] = planLayers({ sizes: [10 * GB], seed: 3, mockFs: true, targetFiles: 1000 });
  const small = plan.files.filter((f) => f.size <= 1024 * 1024).length;
  const large = plan.files.filter((f) => f.size >= 10 * MB).length;
  assert(small > 500, `${small} files of 1 MB or less`);
  assert(large >= 5 && large < 200, `${large} large files`);
});

Deno.test("planLayers() is deterministic under a seed and differs across seeds", () => {
  const a = planLayers({ sizes: [GB, 100 * MB], seed: 9, mockFs: true });
  const b = planLayers({ sizes: [GB, 100 * MB], seed: 9, mockFs: true });
  const c = planLayers({ sizes: [GB, 100 * MB], seed: 10, mockFs: true });
  assertEquals(a, b);
  assertNotEquals(a[0].files.map((f) => f.size), c[0].files.map((f) => f.size));
});

Deno.test("planLayers() variant changes content keys, not the tree", () => {
  const a = planLayers({ sizes: [MB], seed: 1, mockFs: true, variant: "linux/amd64" });
  const b = planLayers({ sizes: [MB], seed: 1, mockFs: true, variant: "linux/arm64" });
  assertEquals(a[0].files.map((f) => f.path), b[0].files.map((f) => f.path));
  assertNotEquals(a[0].files[0].key, b[0].files[0].key);
});

Deno.test("planLayers() refuses a layer smaller than its file count", () => {
  assertThrows(
    () => planLayers({ sizes: [10], seed: 1, mockFs: true, targetFiles: 11 }),
    RangeError,
    "too small for 11",
  );
});
