/**
 * Scratch benchmark of the layer pipeline: MB/s of tar bytes for each
 * compression, hash-only and to a file under /tmp (fdatasync'd, as `dd
 * conv=fdatasync` measures the disk), plus gzip with 0, 1 and 2 Workers.
 *
 * Run: `deno run -A bench/layer_bench.ts [sizeMiB]` (default 1024).
 *
 * @module
 */

import { buildLayer, type BuildLayerOptions } from "../lib/layer.ts";
import type { BlobWriter } from "../lib/oci.ts";
import { planLayers } from "../lib/plan.ts";

/** Layer size in MiB. */
const SIZE_MIB = Number(Deno.args[0] ?? 1024);
/** Where the to-disk runs write. */
const OUT = "/tmp/imgmkr-layer-bench.blob";

/** Writes a blob to a file, fsyncing on commit. */
async function fileWriter(path: string): Promise<BlobWriter> {
  const f = await Deno.open(path, { write: true, create: true, truncate: true });
  return {
    async write(chunk) {
      let off = 0;
      while (off < chunk.length) off += await f.write(chunk.subarray(off));
    },
    async commit() {
      await f.syncData();
      f.close();
    },
    abort() {
      try {
        f.close();
      } catch { /* already closed */ }
      return Promise.resolve();
    },
  };
}

/** CPU seconds (user+sys) of this process so far, from /proc. */
function cpuSeconds(): number {
  const stat = Deno.readTextFileSync("/proc/self/stat");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100; // utime, stime in clock ticks
}

const plan = planLayers({ sizes: [SIZE_MIB * 1024 * 1024], seed: 1 })[0];
const cases: [string, Partial<BuildLayerOptions>][] = [
  ["none", { compression: "none" }],
  ["gzip e100", { compression: "gzip", entropy: 100 }],
  ["gzip e50", { compression: "gzip", entropy: 50 }],
  ["zstd e100", { compression: "zstd", entropy: 100 }],
  ["zstd e50", { compression: "zstd", entropy: 50 }],
];
const workerCases: [string, Partial<BuildLayerOptions>][] = [0, 1, 2].map((
  w,
) => [`gzip e50 workers=${w}`, { compression: "gzip", entropy: 50, workers: w }]);

async function measure(name: string, extra: Partial<BuildLayerOptions>, toDisk: boolean) {
  await Deno.remove(OUT).catch(() => {});
  const writers = toDisk ? [await fileWriter(OUT)] : [];
  const cpu0 = cpuSeconds();
  const t0 = performance.now();
  const r = await buildLayer({ plan, seed: 1, writers, ...extra });
  const secs = (performance.now() - t0) / 1000;
  const cpu = cpuSeconds() - cpu0;
  const mbps = r.tarSize / 1e6 / secs;
  console.log(
    `${name.padEnd(22)} ${toDisk ? "disk" : "hash"}  ${mbps.toFixed(0).padStart(5)} MB/s  ` +
      `cpu ${(cpu / secs * 100).toFixed(0).padStart(3)}%  ratio ${
        (r.descriptor.size / r.tarSize).toFixed(4)
      }`,
  );
}

console.log(`layer: ${SIZE_MIB} MiB single file, ${navigator.hardwareConcurrency} cores`);
for (const toDisk of [false, true]) {
  for (const [name, extra] of cases) await measure(name, extra, toDisk);
}
for (const [name, extra] of workerCases) await measure(name, extra, false);
await Deno.remove(OUT).catch(() => {});
