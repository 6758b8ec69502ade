import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { buildLayer, type BuildLayerOptions, layerDescriptorMediaType } from "../lib/layer.ts";
import { type BlobWriter, type Descriptor, MediaType } from "../lib/oci.ts";
import { type LayerPlan, planLayers } from "../lib/plan.ts";
import { TAR_WORKER_MIN_BYTES, tarSize } from "../lib/tar.ts";

const MiB = 1024 * 1024;

/** A BlobWriter that writes to a file and records what was called. */
class FileWriter implements BlobWriter {
  file?: Deno.FsFile;
  written = 0;
  committed?: Descriptor;
  aborted = 0;
  constructor(readonly path: string, readonly failAfter = Infinity) {}
  async write(chunk: Uint8Array): Promise<void> {
    if (this.written + chunk.length > this.failAfter) throw new Error("disk full");
    this.file ??= await Deno.open(this.path, { write: true, create: true, truncate: true });
    let off = 0;
    while (off < chunk.length) off += await this.file.write(chunk.subarray(off));
    this.written += chunk.length;
  }
  commit(desc: Descriptor): Promise<void> {
    this.file?.close();
    this.file = undefined;
    this.committed = desc;
    return Promise.resolve();
  }
  abort(): Promise<void> {
    this.file?.close();
    this.file = undefined;
    this.aborted++;
    return Promise.resolve();
  }
}

/** Runs a shell pipeline and returns its trimmed stdout. */
async function sh(script: string): Promise<string> {
  const out = await new Deno.Command("bash", { args: ["-o", "pipefail", "-c", script] }).output();
  assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
  return new TextDecoder().decode(out.stdout).trim();
}

const hex = (digest: string) => digest.replace(/^sha256:/, "");

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir();
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("buildLayer() blobs match their descriptor and diffID with real tools", async (t) => {
  const plan = planLayers({ sizes: [9 * MiB + 17], seed: 5, mockFs: true, targetFiles: 30 })[0];
  const cases: [BuildLayerOptions["compression"], string, string][] = [
    ["gzip", "gzip -dc", MediaType.LayerGzip],
    ["zstd", "zstd -dcq", MediaType.LayerZstd],
    ["none", "cat", MediaType.Layer],
  ];
  for (const [compression, decompress, mediaType] of cases) {
    await t.step(`${compression}: digest, size, diffID and extracted files`, async () => {
      await withTempDir(async (dir) => {
        const writer = new FileWriter(`${dir}/blob`);
        const r = await buildLayer({ plan, seed: 5, entropy: 50, compression, writers: [writer] });
        assert.equal(r.descriptor.mediaType, mediaType);
        assert.deepEqual(writer.committed, r.descriptor);
        assert.equal(writer.aborted, 0);
        assert.equal((await Deno.stat(`${dir}/blob`)).size, r.descriptor.size);
        assert.equal(await sh(`sha256sum ${dir}/blob | cut -d' ' -f1`), hex(r.descriptor.digest));
        assert.equal(
          await sh(`${decompress} ${dir}/blob | sha256sum | cut -d' ' -f1`),
          hex(r.diffId),
        );
        assert.equal(Number(await sh(`${decompress} ${dir}/blob | wc -c`)), r.tarSize);
        assert.equal(r.tarSize, tarSize(plan));
        assert.equal(r.fileBytes, plan.size);
        assert.equal(r.fileCount, plan.files.length);
        if (compression === "none") assert.equal(r.descriptor.digest, r.diffId);
        else assert.notEqual(r.descriptor.digest, r.diffId);
        await sh(`mkdir ${dir}/x && ${decompress} ${dir}/blob | tar -x -C ${dir}/x`);
        for (const f of plan.files) {
          assert.equal((await Deno.stat(`${dir}/x/${f.path}`)).size, f.size);
        }
      });
    });
  }
  await t.step("several writers get identical blobs; none is a hash-only pass", async () => {
    await withTempDir(async (dir) => {
      const writers = [new FileWriter(`${dir}/a`), new FileWriter(`${dir}/b`)];
      const teed = await buildLayer({ plan, seed: 5, writers });
      const alone = await buildLayer({ plan, seed: 5 });
      assert.deepEqual(alone, teed);
      assert.equal(
        await sh(`cmp ${dir}/a ${dir}/b && sha256sum < ${dir}/a | cut -d' ' -f1`),
        hex(teed.descriptor.digest),
      );
      for (const w of writers) assert.deepEqual(w.committed, teed.descriptor);
    });
  });
});

Deno.test("buildLayer() digests follow the seed and differ between layers", async (t) => {
  const [one, two] = planLayers({ sizes: [3 * MiB, 3 * MiB], seed: 1 });
  const build = (plan: LayerPlan, seed: number) => buildLayer({ plan, seed });
  const a = await build(one, 1);
  await t.step("same seed, same digests", async () => {
    const again = await build(one, 1);
    assert.equal(again.descriptor.digest, a.descriptor.digest);
    assert.equal(again.diffId, a.diffId);
  });
  await t.step("another seed, other digests", async () => {
    const other = await build(one, 2);
    assert.notEqual(other.descriptor.digest, a.descriptor.digest);
    assert.notEqual(other.diffId, a.diffId);
  });
  await t.step("two layers of the same size, other digests", async () => {
    const b = await build(two, 1);
    assert.equal(b.tarSize, a.tarSize);
    assert.notEqual(b.descriptor.digest, a.descriptor.digest);
    assert.notEqual(b.diffId, a.diffId);
  });
});

Deno.test("buildLayer() with knownDiffId hashes only the blob", async (t) => {
  const [plan] = planLayers({ sizes: [3 * MiB], seed: 1 });
  // A diffID that is surely not the tar's: returned as given, so the tar was not hashed.
  const stand = `sha256:${"0".repeat(64)}`;
  for (const compression of ["gzip", "zstd"] as const) {
    await t.step(`${compression}: same blob digest, the given diffID`, async () => {
      const full = await buildLayer({ plan, seed: 1, compression });
      const again = await buildLayer({ plan, seed: 1, compression, knownDiffId: stand });
      assert.deepEqual(again.descriptor, full.descriptor);
      assert.equal(again.diffId, stand);
    });
  }
  await t.step("none: the blob is the tar, so it is hashed anyway", async () => {
    const full = await buildLayer({ plan, seed: 1, compression: "none" });
    const again = await buildLayer({ plan, seed: 1, compression: "none", knownDiffId: stand });
    assert.equal(again.diffId, full.diffId);
    assert.equal(again.descriptor.digest, full.diffId);
  });
});

Deno.test("buildLayer() with knownDigest hashes no blob, and skipDiffId no tar", async (t) => {
  // Big enough for the tar to be generated (and hashed) on a Worker, and small enough to be quick.
  const [plan] = planLayers({ sizes: [TAR_WORKER_MIN_BYTES + 3 * MiB], seed: 1 });
  const stand = `sha256:${"0".repeat(64)}`;
  for (const compression of ["gzip", "zstd", "none"] as const) {
    const full = await buildLayer({ plan, seed: 1, compression });
    await t.step(
      `${compression}: knownDigest is returned as given, sizes still counted`,
      async () => {
        const again = await buildLayer({
          plan,
          seed: 1,
          compression,
          knownDigest: stand,
          knownDiffId: compression === "none" ? undefined : full.diffId,
        });
        assert.equal(again.descriptor.digest, stand);
        assert.equal(again.descriptor.size, full.descriptor.size);
        assert.equal(again.diffId, compression === "none" ? stand : full.diffId);
      },
    );
    // (Without compression the digest is the diffID: nothing is left to hash.)
    if (compression !== "none") {
      await t.step(`${compression}: knownDigest alone still hashes the tar`, async () => {
        const again = await buildLayer({ plan, seed: 1, compression, knownDigest: stand });
        assert.equal(again.diffId, full.diffId);
      });
    }
    await t.step(
      `${compression}: skipDiffId leaves the diffID empty but the digest right`,
      async () => {
        const again = await buildLayer({ plan, seed: 1, compression, skipDiffId: true });
        assert.deepEqual(again.descriptor, full.descriptor);
        // Without compression the one hash is both, so nothing is skipped.
        assert.equal(again.diffId, compression === "none" ? full.diffId : "");
      },
    );
  }
});

Deno.test("buildLayer() aborts every writer and rethrows on failure", async (t) => {
  const plan = planLayers({ sizes: [40 * MiB], seed: 1 })[0];
  await t.step("an aborted signal stops the build promptly", async () => {
    await withTempDir(async (dir) => {
      const writers = [new FileWriter(`${dir}/a`), new FileWriter(`${dir}/b`)];
      const controller = new AbortController();
      const reason = new Error("stop now");
      let progress = 0;
      const build = buildLayer({
        plan,
        seed: 1,
        writers,
        signal: controller.signal,
        onProgress: (done) => {
          progress = done;
          if (done >= 4 * MiB) controller.abort(reason);
        },
      });
      await assert.rejects(build, (e) => e === reason);
      assert(progress < 20 * MiB, `went on to ${progress} bytes`);
      for (const w of writers) {
        assert.equal(w.aborted, 1);
        assert.equal(w.committed, undefined);
        assert(w.written < 20 * MiB);
      }
    });
  });
  await t.step("a signal aborted before the start writes nothing", async () => {
    const writer = new FileWriter("/nonexistent/never-written");
    const signal = AbortSignal.abort(new Error("early"));
    await assert.rejects(buildLayer({ plan, seed: 1, writers: [writer], signal }), /early/);
    assert.equal(writer.written, 0);
    assert.equal(writer.aborted, 1);
  });
  await t.step("a writer error propagates and aborts the others", async () => {
    await withTempDir(async (dir) => {
      const good = new FileWriter(`${dir}/good`);
      const bad = new FileWriter(`${dir}/bad`, 5 * MiB);
      await assert.rejects(buildLayer({ plan, seed: 1, writers: [good, bad] }), /disk full/);
      assert.equal(good.aborted, 1);
      assert.equal(bad.aborted, 1);
      assert.equal(good.committed, undefined);
    });
  });
  await t.step("a bad level is rejected before writing", async () => {
    const writer = new FileWriter("/nonexistent/never-written");
    await assert.rejects(
      buildLayer({ plan, seed: 1, compressionLevel: 12, writers: [writer] }),
      RangeError,
    );
    assert.equal(writer.aborted, 1);
  });
});

Deno.test("buildLayer() reports progress up to the tar size", async () => {
  const plan = planLayers({ sizes: [5 * MiB], seed: 1, mockFs: true })[0];
  const seen: number[] = [];
  const r = await buildLayer({ plan, seed: 1, onProgress: (n) => seen.push(n) });
  assert(seen.length >= 3);
  assert.deepEqual(seen, [...seen].sort((a, b) => a - b));
  assert.equal(seen.at(-1), r.tarSize);
});

Deno.test("layerDescriptorMediaType() names the OCI layer media types", () => {
  assert.equal(layerDescriptorMediaType("gzip"), MediaType.LayerGzip);
  assert.equal(layerDescriptorMediaType("zstd"), MediaType.LayerZstd);
  assert.equal(layerDescriptorMediaType("none"), MediaType.Layer);
});

Deno.test("buildLayer() reuses buffers only with writers done with them, and the files stay right", async (t) => {
  const [plan] = planLayers({ sizes: [TAR_WORKER_MIN_BYTES + 20 * MiB + 3], seed: 2 });
  for (const compression of ["gzip", "none", "zstd"] as const) {
    await t.step(
      `${compression}: each written file has the digest buildLayer reports`,
      async () => {
        await withTempDir(async (dir) => {
          // retainsChunks false: written chunks go back for reuse; undefined: they never do.
          const reusing = Object.assign(new FileWriter(`${dir}/reusing`), { retainsChunks: false });
          const plain = new FileWriter(`${dir}/plain`);
          for (const writers of [[reusing], [plain]]) {
            const r = await buildLayer({ plan, seed: 2, entropy: 80, compression, writers });
            const file = await Deno.readFile(writers[0].path);
            assert.equal(
              `sha256:${createHash("sha256").update(file).digest("hex")}`,
              r.descriptor.digest,
            );
            assert.equal(file.length, r.descriptor.size);
          }
        });
      },
    );
  }
});
