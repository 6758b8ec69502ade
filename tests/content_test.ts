import { assert, assertEquals, assertNotEquals } from "./support/assert.ts";
import { ENTROPY_UNIT, fileSegments, repeatedSegmentLengths, Xorshift128 } from "../lib/content.ts";
import { run } from "./support/docker.ts";

function collect(
  size: number,
  key: string,
  seed = 1,
  entropy = 100,
  chunkSize?: number,
): Uint8Array {
  const out = new Uint8Array(size);
  let off = 0;
  for (const seg of fileSegments(size, { seed, key, entropy, chunkSize })) {
    out.set(seg.bytes, off);
    off += seg.bytes.length;
  }
  assertEquals(off, size);
  return out;
}

async function gzipSize(bytes: Uint8Array): Promise<number> {
  const child = new Deno.Command("gzip", { args: ["-c", "-6"], stdin: "piped", stdout: "piped" })
    .spawn();
  const w = child.stdin.getWriter();
  const [out] = await Promise.all([child.output(), w.write(bytes).then(() => w.close())]);
  return out.stdout.length;
}

Deno.test("fileSegments() gives the same bytes however they are chunked", async (t) => {
  const size = 3 * ENTROPY_UNIT + 1234;
  for (const entropy of [100, 60, 0]) {
    await t.step(`entropy ${entropy}`, () => {
      const whole = collect(size, "k", 5, entropy);
      for (const chunk of [1, 3, 4097, 65536, 1 << 20]) {
        if (chunk === 1 && entropy !== 0) continue; // too slow to be worth it byte by byte for random
        assertEquals(collect(size, "k", 5, entropy, chunk), whole, `chunk ${chunk}`);
      }
    });
  }
  await t.step("odd-sized fills of the generator", () => {
    const a = new Xorshift128(1, "x");
    const b = new Xorshift128(1, "x");
    const one = new Uint8Array(1001);
    a.fill(one);
    const parts = [new Uint8Array(3), new Uint8Array(5), new Uint8Array(993)];
    for (const p of parts) b.fill(p);
    assertEquals(new Uint8Array([...parts[0], ...parts[1], ...parts[2]]), one);
  });
});

Deno.test("fileSegments() streams differ by key and by seed", () => {
  const a = collect(4096, "layer1/f");
  assertNotEquals(collect(4096, "layer2/f"), a);
  assertNotEquals(collect(4096, "layer1/f", 2), a);
  assertEquals(collect(4096, "layer1/f"), a);
});

Deno.test("fileSegments() at entropy 100 does not compress with real gzip", async () => {
  const bytes = collect(8 * 1024 * 1024, "gz");
  const gz = await gzipSize(bytes);
  assert(gz > bytes.length * 0.99, `gzip saved ${(100 - (gz / bytes.length) * 100).toFixed(2)}%`);
});

Deno.test("fileSegments() entropy sets the share of random bytes, which gzip cannot shrink", async (t) => {
  for (const entropy of [0, 25, 50, 75]) {
    await t.step(`entropy ${entropy}`, async () => {
      const size = 4 * 1024 * 1024;
      let random = 0;
      for (const seg of fileSegments(size, { seed: 1, key: "e", entropy })) {
        if (seg.random) random += seg.bytes.length;
      }
      assert(Math.abs(random / size - entropy / 100) < 0.01, `random share ${random / size}`);
      const ratio = (await gzipSize(collect(size, "e", 1, entropy))) / size;
      assert(
        ratio > entropy / 100 - 0.01 && ratio < entropy / 100 + 0.05,
        `gzip ratio ${ratio.toFixed(3)}`,
      );
    });
  }
});

Deno.test("support run() works (sanity of the helper the tests rely on)", async () => {
  assertEquals((await run(["true"])).code, 0);
  assertEquals((await run(["false"])).code, 1);
});

Deno.test("repeatedSegmentLengths() names every segment length fileSegments() makes but a file's last", async (t) => {
  for (const entropy of [100, 75, 50, 25, 1, 0]) {
    await t.step(`entropy ${entropy}`, () => {
      const lengths = new Set(repeatedSegmentLengths(entropy));
      const segs = [...fileSegments(5 * 1024 * 1024 + 123, { seed: 3, key: "k", entropy })];
      for (const seg of segs.slice(0, -1)) {
        assert(lengths.has(seg.bytes.length), `${seg.bytes.length} not in ${[...lengths]}`);
      }
      assert(lengths.size >= 1 && lengths.size <= 2);
    });
  }
});
