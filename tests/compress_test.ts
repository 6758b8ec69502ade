import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import type { Segment } from "../lib/content.ts";
import { type CompressorOptions, createCompressor, GZIP_JOB_SIZE } from "../lib/compress.ts";
import { planLayers } from "../lib/plan.ts";
import { tarSegments, tarSize } from "../lib/tar.ts";
import { concat } from "./support/bytes.ts";

const MiB = 1024 * 1024;

/** The tar of a one-file layer of `size` bytes, as segments (fresh each call). */
function tar(size: number, entropy: number, seed = 1): Segment[] {
  const plan = planLayers({ sizes: [size], seed })[0];
  return [...tarSegments(plan, { seed, entropy })];
}

/** Input bytes of segments, copied before the compressor may take them. */
function bytesOf(segs: Segment[]): Uint8Array {
  return concat(segs.map((s) => s.bytes.slice()));
}

async function compress(segs: Segment[], options: CompressorOptions): Promise<Uint8Array> {
  const out: Uint8Array[] = [];
  for await (const chunk of createCompressor(options).compress(segs)) out.push(chunk);
  return concat(out);
}

function sha256(b: Uint8Array): string {
  return createHash("sha256").update(b).digest("hex");
}

/** Runs a real decompressor on `blob` (via a file, as a runtime would) and returns its output. */
async function decompress(cmd: string[], blob: Uint8Array): Promise<Uint8Array> {
  const path = await Deno.makeTempFile();
  try {
    await Deno.writeFile(path, blob);
    const out = await new Deno.Command(cmd[0], { args: [...cmd.slice(1), path] }).output();
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    return out.stdout;
  } finally {
    await Deno.remove(path);
  }
}

const DECOMPRESSORS: Record<string, string[]> = {
  gzip: ["gzip", "-dc"],
  zstd: ["zstd", "-dcq"],
};

Deno.test("createCompressor() output decompresses to exactly its input with real tools", async (t) => {
  // File sizes around stored-block (65535), job (1 MiB) and inline-threshold boundaries.
  const sizes = [1, 65535, 65536 + 7, GZIP_JOB_SIZE - 1024, GZIP_JOB_SIZE + 1, 12 * MiB + 3];
  for (const compression of ["gzip", "zstd"] as const) {
    for (const entropy of [100, 50, 0]) {
      for (const size of sizes) {
        await t.step(`${compression}, entropy ${entropy}, file of ${size} bytes`, async () => {
          const segs = tar(size, entropy);
          const input = bytesOf(segs);
          const blob = await compress(segs, { compression });
          const output = await decompress(DECOMPRESSORS[compression], blob);
          assert.equal(output.length, input.length);
          assert.equal(sha256(output), sha256(input));
        });
      }
    }
  }
  await t.step("gzip -t accepts the CRC-32 and ISIZE trailer", async () => {
    const blob = await compress(tar(3 * MiB, 50), { compression: "gzip" });
    const path = await Deno.makeTempFile({ suffix: ".gz" });
    try {
      await Deno.writeFile(path, blob);
      const out = await new Deno.Command("gzip", { args: ["-t", path] }).output();
      assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    } finally {
      await Deno.remove(path);
    }
  });
  await t.step("none passes the bytes through unchanged", async () => {
    const segs = tar(2 * MiB + 5, 50);
    const input = bytesOf(segs);
    assert.equal(sha256(await compress(segs, { compression: "none" })), sha256(input));
  });
});

Deno.test("gzip compressor keeps random content within 1% of its input", async () => {
  const size = 16 * MiB;
  const blob = await compress(tar(size, 100), { compression: "gzip" });
  const ratio = blob.length / tarSize(planLayers({ sizes: [size], seed: 1 })[0]);
  assert(ratio < 1.01, `ratio ${ratio}`);
  // Stored blocks cost 5 bytes per 64 KiB: the overhead is about 0.008%.
  assert(ratio > 0.999, `ratio ${ratio}`);
});

Deno.test("compressors really compress the pattern part at entropy 50", async (t) => {
  for (const compression of ["gzip", "zstd"] as const) {
    await t.step(compression, async () => {
      const segs = tar(16 * MiB, 50);
      const input = bytesOf(segs).length;
      const ratio = (await compress(segs, { compression })).length / input;
      assert(ratio > 0.49 && ratio < 0.58, `ratio ${ratio}`);
    });
  }
  await t.step("gzip at entropy 0 shrinks to a small fraction", async () => {
    const segs = tar(8 * MiB, 0);
    const ratio = (await compress(segs, { compression: "gzip" })).length / (8 * MiB);
    assert(ratio < 0.05, `ratio ${ratio}`);
  });
});

Deno.test("gzip compressor output is deterministic whatever the Worker count", async (t) => {
  const size = 20 * MiB + 12345;
  for (const entropy of [100, 50]) {
    await t.step(`entropy ${entropy}`, async () => {
      const digests = new Set<string>();
      for (const workers of [0, 1, 2, 2, 3]) {
        digests.add(sha256(await compress(tar(size, entropy), { compression: "gzip", workers })));
      }
      assert.equal(digests.size, 1);
    });
  }
  await t.step("zstd twice gives the same bytes", async () => {
    const a = sha256(await compress(tar(6 * MiB, 50), { compression: "zstd" }));
    const b = sha256(await compress(tar(6 * MiB, 50), { compression: "zstd" }));
    assert.equal(a, b);
  });
});

Deno.test("compression levels are validated and used", async (t) => {
  const bad: [CompressorOptions, RegExp][] = [
    [{ compression: "gzip", level: -1 }, /gzip compression level -1: .* from 0 to 9/],
    [{ compression: "gzip", level: 10 }, /from 0 to 9/],
    [{ compression: "gzip", level: 1.5 }, /whole number/],
    [{ compression: "zstd", level: 0 }, /zstd compression level 0: .* from 1 to 19/],
    [{ compression: "zstd", level: 20 }, /from 1 to 19/],
    [{ compression: "gzip", workers: -1 }, /workers/],
  ];
  for (const [options, message] of bad) {
    await t.step(`rejects ${JSON.stringify(options)}`, () => {
      assert.throws(
        () => createCompressor(options),
        (e) => e instanceof RangeError && message.test(e.message),
      );
    });
  }
  await t.step("gzip level 0 stores everything, level 9 is smaller than level 1", async () => {
    const size = 2 * MiB;
    const sizes = new Map<number, number>();
    for (const level of [0, 1, 9]) {
      const blob = await compress(tar(size, 50), { compression: "gzip", level });
      const output = await decompress(DECOMPRESSORS.gzip, blob);
      assert.equal(sha256(output), sha256(bytesOf(tar(size, 50))));
      sizes.set(level, blob.length);
    }
    assert(sizes.get(0)! > size);
    assert(sizes.get(9)! < sizes.get(1)!);
  });
  await t.step("zstd level 19 is smaller than level 1", async () => {
    const l1 = (await compress(tar(2 * MiB, 0), { compression: "zstd", level: 1 })).length;
    const l19 = (await compress(tar(2 * MiB, 0), { compression: "zstd", level: 19 })).length;
    assert(l19 < l1, `${l19} >= ${l1}`);
  });
});

Deno.test("compressors release their resources when the consumer stops early", async (t) => {
  for (const compression of ["gzip", "zstd", "none"] as const) {
    await t.step(compression, async () => {
      let pulled = 0;
      function* source(): Generator<Segment> {
        const plan = planLayers({ sizes: [64 * MiB], seed: 1 })[0];
        for (const seg of tarSegments(plan, { seed: 1, entropy: 50 })) {
          pulled += seg.bytes.length;
          yield seg;
        }
      }
      for await (const _ of createCompressor({ compression, workers: 2 }).compress(source())) {
        if (pulled > 10 * MiB) break;
      }
      // Stopping must not drain the rest of the source.
      assert(pulled < 40 * MiB, `pulled ${pulled}`);
    });
  }
});

Deno.test("buffers handed back for reuse never change a byte of the output", async (t) => {
  const size = 12 * MiB + 777; // beyond the inline gzip jobs, so Workers encode too
  for (const compression of ["gzip", "zstd"] as const) {
    for (const entropy of [100, 40]) {
      await t.step(`${compression}, entropy ${entropy}`, async () => {
        const want = sha256(await compress(tar(size, entropy), { compression }));
        const compressor = createCompressor({ compression });
        // Every input segment given back is scribbled over at once, as a reusing source would.
        let released = 0;
        const release = (bytes: Uint8Array) => {
          released++;
          bytes.fill(0xa5);
        };
        const hash = createHash("sha256");
        for await (const chunk of compressor.compress(tar(size, entropy), { release })) {
          hash.update(chunk);
          // And each output chunk goes back as soon as it is read: later output must not
          // land in it before it was read.
          compressor.release(chunk);
        }
        assert.equal(hash.digest("hex"), want);
        assert(released > 0, "the compressor handed input buffers back");
      });
    }
  }
  await t.step("none never hands input back: its output is the input", async () => {
    let released = 0;
    const out = await (async () => {
      const chunks: Uint8Array[] = [];
      const compressor = createCompressor({ compression: "none" });
      for await (const c of compressor.compress(tar(3 * MiB, 100), { release: () => released++ })) {
        chunks.push(c);
      }
      return concat(chunks);
    })();
    assert.equal(out.length, tarSize(planLayers({ sizes: [3 * MiB], seed: 1 })[0]));
    assert.equal(released, 0);
  });
});
