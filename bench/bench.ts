/**
 * End-to-end benchmark: spawns the real CLI and the tools it is weighed
 * against (dd, docker load, skopeo) in one run, and reports wall time, MiB/s
 * and peak RSS per command plus ratios between them, as a plain-text table on
 * stdout and as `.bench/results.json`. Goals are ratios, so they hold on any
 * machine; the exit code is non-zero only when a command fails.
 *
 * Run: `deno task bench`; `BENCH_SIZE=64MB BENCH_ROUNDS=1 deno task bench` for a quick try.
 *
 * @module
 */

import { fileURLToPath } from "node:url";
import { formatSize, parseSize } from "../lib/sizes.ts";
// The tests' registry helper: Debian's docker-registry on a free 127.0.0.1 port, plain HTTP.
import { type RegistryServer, startRegistry } from "../tests/support/registry.ts";

/** Layer size when BENCH_SIZE is unset: big enough that process start-up is noise. */
const DEFAULT_SIZE = "1GB";
/** Bytes in a MiB: speeds are MiB/s, and dd writes blocks of this size. */
const MIB = 1024 * 1024;
/** Seed of the local rows: fixed, so every run writes the same bytes. */
const SEED = 1;
/** Seed of the push rows: apart from {@linkcode SEED}, so no blob of the local rows is reused. */
const PUSH_SEED = 9;
/** Files in the mock-fs row: a rootfs-like count, where per-file work shows. */
const MOCK_FILES = 10_000;
/** Reference of the images that never reach an engine. */
const REFERENCE = "bench/x:1";
/** GNU time: `-f %M` gives the peak RSS in KB; without it RSS is n/a. */
const TIME_BIN = "/usr/bin/time";
/** The repository root: the CLI runs from here and the results go under it. */
const ROOT = fileURLToPath(new URL("../", import.meta.url));
/** Where the results go (gitignored). */
const RESULTS_FILE = `${ROOT}.bench/results.json`;
/**
 * Rounds when BENCH_ROUNDS is unset. Every round runs every row once, so the
 * rows of a ratio alternate, and a row's figure is the median of its rounds:
 * one slow run on a noisy machine moves no ratio.
 */
const DEFAULT_ROUNDS = 3;
/** Exit code for a bad BENCH_SIZE, as imgmkr uses for bad usage. */
const EXIT_USAGE = 2;
/** Exit codes after a signal, as shells report them. */
const SIGNAL_EXIT: Record<string, number> = { SIGINT: 130, SIGTERM: 143 };

/** A goal for a ratio. */
interface Goal {
  /** `>=` when higher is better, `<=` when lower is. */
  op: ">=" | "<=";
  /** The bound. */
  value: number;
}

/** One measured command. */
interface Row {
  /** Name the ratios refer to. */
  key: string;
  /** The step (1 to 6) the row belongs to. */
  step: number;
  /** What was measured. */
  label: string;
  /** The command; `imgmkr` stands for `deno run -A main.ts` (under /usr/bin/time). */
  argv: string[];
  /** Bytes the MiB/s figure is of. */
  bytes: number;
  /** `failed` when the command failed or could not run. */
  status: "ok" | "failed";
  /** Wall time: the median of {@linkcode samples}. */
  seconds?: number;
  /** Wall time of each round. */
  samples: number[];
  /** `bytes` per second, in MiB. */
  mibPerSec?: number;
  /** Highest peak RSS of the row's imgmkr runs (null when /usr/bin/time is missing). */
  peakRssMB?: number | null;
  /** Why the row failed. */
  error?: string;
}

/** How one ratio is made from two rows. */
interface RatioSpec {
  /** What is compared. */
  label: string;
  /** Numerator row. */
  of: string;
  /** Denominator row. */
  to: string;
  /** Compare seconds rather than MiB/s. */
  time?: boolean;
  /** The goal, if any. */
  goal?: Goal;
}

/** A computed ratio. */
interface Ratio extends RatioSpec {
  /** The ratio; undefined when a row failed. */
  value?: number;
  /** Whether the goal is met. */
  met?: boolean;
}

/** The ratios reported, with the brief's goals. */
const RATIOS: readonly RatioSpec[] = [
  { label: "oci none / dd (speed)", of: "oci-none", to: "dd", goal: { op: ">=", value: 0.75 } },
  { label: "oci gzip / dd (speed)", of: "oci-gzip", to: "dd" },
  { label: "oci zstd / dd (speed)", of: "oci-zstd", to: "dd" },
  { label: "oci gzip / build (speed)", of: "oci-gzip", to: "build", goal: { op: ">=", value: 2 } },
  { label: "load / build (speed)", of: "load", to: "build" },
  {
    label: "load / docker load (time)",
    of: "load",
    to: "docker-load",
    time: true,
    goal: { op: "<=", value: 1.25 },
  },
  {
    label: "mock-fs gzip / single-file gzip (speed)",
    of: "mock-fs",
    to: "oci-gzip",
    goal: { op: ">=", value: 0.5 },
  },
  { label: "push / skopeo copy (speed)", of: "push", to: "skopeo", goal: { op: ">=", value: 1 } },
  { label: "push, warm layer cache / skopeo copy (speed)", of: "push-warm", to: "skopeo" },
];

/** State of one benchmark run. */
interface Bench {
  /** BENCH_SIZE as given. */
  sizeText: string;
  /** BENCH_SIZE in bytes. */
  size: number;
  /** BENCH_ROUNDS. */
  rounds: number;
  /** The run's temp dir; everything written goes under it. */
  tmp: string;
  /** Whether /usr/bin/time exists. */
  hasTime: boolean;
  /** Rows so far. */
  rows: Row[];
  /** Remarks printed under the table. */
  notes: string[];
  /** Steps that threw (a bug in this file or a broken machine); each makes the exit code 1. */
  stepErrors: number;
  /** Docker tags this run may have created, removed at the end in any case. */
  tags: Set<string>;
}

/** What a finished command returned. */
interface Outcome {
  code: number;
  seconds: number;
  stdout: string;
  stderr: string;
  peakRssKB?: number;
}

/** Thrown once a signal stops the run. */
class Interrupted extends Error {}

const running = new Set<Deno.ChildProcess>();
/** The signal that stopped the run, if any. */
let interrupted: Deno.Signal | undefined;
const decoder = new TextDecoder();

/** Processes below `pid`, deepest first (Linux /proc; empty elsewhere). */
function descendants(pid: number): number[] {
  const kids: number[] = [];
  try {
    for (const task of Deno.readDirSync(`/proc/${pid}/task`)) {
      const text = Deno.readTextFileSync(`/proc/${pid}/task/${task.name}/children`);
      kids.push(...text.split(/\s+/).filter(Boolean).map(Number));
    }
  } catch {
    // Gone already, or no /proc.
  }
  return kids.flatMap((k) => [...descendants(k), k]);
}

/** Stops the run: the running commands (and what they started) get SIGTERM. */
function onSignal(signal: Deno.Signal): void {
  interrupted ??= signal;
  for (const child of running) {
    for (const pid of [...descendants(child.pid), child.pid]) {
      try {
        Deno.kill(pid, "SIGTERM");
      } catch {
        // Already exited.
      }
    }
  }
}

/** Options for {@linkcode run}. */
interface RunOptions {
  /** Added to the inherited environment. */
  env?: Record<string, string>;
  /** Run even after a signal (for cleanup). */
  cleanup?: boolean;
}

/** Runs a command from the repository root, timing it from spawn to exit. */
async function run(argv: string[], options: RunOptions = {}): Promise<Outcome> {
  if (interrupted && !options.cleanup) throw new Interrupted(`interrupted by ${interrupted}`);
  const started = performance.now();
  const child = new Deno.Command(argv[0], {
    args: argv.slice(1),
    cwd: ROOT,
    env: options.env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  running.add(child);
  try {
    const out = await child.output();
    return {
      code: out.code,
      seconds: (performance.now() - started) / 1000,
      stdout: decoder.decode(out.stdout),
      stderr: decoder.decode(out.stderr),
    };
  } finally {
    running.delete(child);
  }
}

/** Runs the CLI (`deno run -A main.ts`), under /usr/bin/time when it exists. */
async function runImgmkr(
  bench: Bench,
  args: string[],
  env?: Record<string, string>,
): Promise<Outcome> {
  const cli = [Deno.execPath(), "run", "-A", `${ROOT}main.ts`, ...args];
  // A layer cache of this run's own, so the user's cache never changes a figure.
  env = { XDG_CACHE_HOME: `${bench.tmp}/cache`, ...env };
  if (!bench.hasTime) return run(cli, { env });
  const rssFile = `${bench.tmp}/rss`;
  await removeQuietly(rssFile);
  const out = await run([TIME_BIN, "-o", rssFile, "-f", "%M", ...cli], { env });
  // On failure GNU time writes "Command exited with non-zero status N" first.
  const last = (await Deno.readTextFile(rssFile).catch(() => "")).trim().split("\n").pop();
  const kb = Number(last);
  return { ...out, peakRssKB: last && Number.isFinite(kb) ? kb : undefined };
}

/** What {@linkcode measure} runs. */
interface RowSpec {
  key: string;
  step: number;
  label: string;
  argv: string[];
  /** Bytes the speed is of: BENCH_SIZE unless given. */
  bytes?: number;
  /** Run `argv` as imgmkr arguments. */
  imgmkr?: boolean;
  env?: Record<string, string>;
}

/** The row of `spec` (made on its first round), marked failed with `error` if given. */
function addRow(bench: Bench, spec: RowSpec, error?: string): Row {
  let row = bench.rows.find((r) => r.key === spec.key);
  if (!row) {
    row = {
      key: spec.key,
      step: spec.step,
      label: spec.label,
      argv: spec.imgmkr ? ["imgmkr", ...spec.argv] : spec.argv,
      bytes: spec.bytes ?? bench.size,
      status: "ok",
      samples: [],
    };
    bench.rows.push(row);
  }
  if (error !== undefined) {
    row.status = "failed";
    row.error ??= error;
  }
  return row;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/**
 * Runs one round of a row's command and records it; a failure is printed and
 * recorded (a row with a failed round is failed), never thrown. Dirty pages of
 * earlier rows are flushed first (`sync`, untimed), so no row pays for another's writeback.
 */
async function measure(bench: Bench, spec: RowSpec): Promise<Row> {
  const row = addRow(bench, spec);
  await run(["sync"]).catch((e) => {
    if (e instanceof Interrupted) throw e;
  });
  log(`[${spec.step}] ${spec.label} ...`);
  let out: Outcome;
  try {
    out = spec.imgmkr
      ? await runImgmkr(bench, spec.argv, spec.env)
      : await run(spec.argv, { env: spec.env });
  } catch (e) {
    if (e instanceof Interrupted) throw e;
    addRow(bench, spec, `cannot run ${spec.argv[0]}: ${(e as Error).message}`);
    log(`[${spec.step}] ${spec.label}: FAILED, ${row.error}`);
    return row;
  }
  if (spec.imgmkr) {
    const mb = out.peakRssKB === undefined ? null : out.peakRssKB / 1024;
    row.peakRssMB = mb === null || row.peakRssMB === null ? null : Math.max(mb, row.peakRssMB ?? 0);
  }
  if (out.code !== 0) {
    addRow(bench, spec, `exit code ${out.code}: ${out.stderr.trim()}`);
    log(`[${spec.step}] ${spec.label}: FAILED with exit code ${out.code}; stderr:\n${out.stderr}`);
    return row;
  }
  row.samples.push(out.seconds);
  row.seconds = median(row.samples);
  row.mibPerSec = row.bytes / MIB / row.seconds;
  log(`[${spec.step}] ${spec.label}: ${out.seconds.toFixed(3)} s`);
  return row;
}

/** Records a row that could not run because something before it failed. */
function skipRow(bench: Bench, spec: RowSpec, reason: string): void {
  addRow(bench, spec, reason);
  log(`[${spec.step}] ${spec.label}: FAILED, ${reason}`);
}

function log(line: string): void {
  console.error(line);
}

/** The flags every layer row shares. */
function layerArgs(bench: Bench, seed: number): string[] {
  return ["--layer-sizes", bench.sizeText, "--seed", String(seed), "--quiet"];
}

async function removeQuietly(path: string): Promise<void> {
  await Deno.remove(path, { recursive: true }).catch(() => {});
}

/** `docker rmi -f`, ignoring a missing image or engine. */
async function rmi(bench: Bench, tag: string, options: RunOptions = {}): Promise<void> {
  bench.tags.add(tag);
  await run(["docker", "rmi", "-f", tag], options).catch((e) => {
    if (e instanceof Interrupted) throw e;
  });
}

function dockerTag(step: string): string {
  return `imgmkr-bench/${step}:1`;
}

/** Step 1: the disk's sequential write speed, the baseline of the oci rows. */
async function stepDd(bench: Bench): Promise<void> {
  const count = Math.ceil(bench.size / MIB);
  const file = `${bench.tmp}/dd`;
  await measure(bench, {
    key: "dd",
    step: 1,
    label: "dd bs=1M conv=fdatasync",
    argv: ["dd", "if=/dev/zero", `of=${file}`, "bs=1M", `count=${count}`, "conv=fdatasync"],
    bytes: count * MIB,
  });
  await removeQuietly(file);
}

/** Step 2: one single-file layer into an OCI layout, per compression. */
async function stepOci(bench: Bench): Promise<void> {
  for (const compression of ["none", "gzip", "zstd"]) {
    const dir = `${bench.tmp}/oci-${compression}`;
    const row = await measure(bench, {
      key: `oci-${compression}`,
      step: 2,
      label: `imgmkr oci: ${compression}`,
      argv: [
        ...layerArgs(bench, SEED),
        "--compression",
        compression,
        "--output",
        `oci:${dir}`,
        REFERENCE,
      ],
      imgmkr: true,
    });
    if (compression === "none" && row.status === "ok") await checkLayerIsNew(bench, dir);
    await removeQuietly(dir);
  }
}

/** The diff IDs of the one image in an OCI layout. */
async function layoutDiffIds(dir: string): Promise<string[]> {
  const blob = async (digest: string) =>
    JSON.parse(await Deno.readTextFile(`${dir}/blobs/${digest.replace(":", "/")}`));
  const index = JSON.parse(await Deno.readTextFile(`${dir}/index.json`));
  const manifest = await blob(index.manifests[0].digest);
  return (await blob(manifest.config.digest)).rootfs.diff_ids;
}

/**
 * Notes when an image already in the engine holds the seed's uncompressed
 * layer: `docker load` skips a layer it has, and the load rows would be too fast.
 */
async function checkLayerIsNew(bench: Bench, layoutDir: string): Promise<void> {
  try {
    const [diffId] = await layoutDiffIds(layoutDir);
    const ids = (await run(["docker", "image", "ls", "-q", "--no-trunc"])).stdout.split(/\s+/)
      .filter(Boolean);
    if (ids.length === 0) return;
    const out = await run([
      "docker",
      "image",
      "inspect",
      "--format",
      "{{.Id}} {{.RepoTags}} {{.RootFS.Layers}}",
      ...ids,
    ]);
    const holders = out.stdout.split("\n").filter((l) => l.includes(diffId));
    if (holders.length > 0) {
      bench.notes.push(
        `the engine already holds layer ${diffId.slice(0, 19)} (${holders.join("; ")}): ` +
          "the load and docker load rows skip it and are too fast",
      );
    }
  } catch (e) {
    if (e instanceof Interrupted) throw e;
    bench.notes.push(`could not check the engine for the layer: ${(e as Error).message}`);
  }
}

/** Step 3: the Dockerfile path with docker's legacy builder, and `--output load`. */
async function stepEngine(bench: Bench): Promise<void> {
  const build = dockerTag("build");
  await rmi(bench, build);
  await measure(bench, {
    key: "build",
    step: 3,
    label: "imgmkr build (docker legacy builder)",
    argv: [
      ...layerArgs(bench, SEED),
      "--builder",
      "docker",
      "--output",
      "build",
      // Same disk as the default (the system temp dir); under the run's dir so it is cleaned up.
      "--tmpdir-prefix",
      bench.tmp,
      build,
    ],
    imgmkr: true,
    // The legacy builder even where BuildKit is the default (docker 23 and later).
    env: { DOCKER_BUILDKIT: "0" },
  });
  await rmi(bench, build);

  const load = dockerTag("load");
  await rmi(bench, load);
  await measure(bench, {
    key: "load",
    step: 3,
    label: "imgmkr load (docker)",
    argv: [...layerArgs(bench, SEED), "--builder", "docker", "--output", "load", load],
    imgmkr: true,
  });
  await rmi(bench, load);
}

/** Step 4: a plain `docker load` of an uncompressed archive, the yardstick of `--output load`. */
async function stepDockerLoad(bench: Bench): Promise<void> {
  const file = `${bench.tmp}/archive.tar`;
  const tag = dockerTag("docker-load");
  try {
    const archive = await measure(bench, {
      key: "oci-archive",
      step: 4,
      label: "imgmkr oci-archive: none",
      argv: [
        ...layerArgs(bench, SEED),
        "--compression",
        "none",
        "--output",
        `oci-archive:${file}`,
        tag,
      ],
      imgmkr: true,
    });
    const spec = {
      key: "docker-load",
      step: 4,
      label: "docker load -i <oci-archive>",
      argv: ["docker", "load", "-i", file],
    };
    if (archive.status !== "ok") return skipRow(bench, spec, "skipped: the oci-archive row failed");
    await rmi(bench, tag);
    await measure(bench, spec);
  } finally {
    await rmi(bench, tag);
    await removeQuietly(file);
  }
}

/** Step 5: the same bytes spread over many files. */
async function stepMockFs(bench: Bench): Promise<void> {
  const dir = `${bench.tmp}/mock-fs`;
  await measure(bench, {
    key: "mock-fs",
    step: 5,
    label: `imgmkr oci: gzip --mock-fs ${MOCK_FILES} files`,
    argv: [
      ...layerArgs(bench, SEED),
      "--mock-fs",
      "--target-files",
      String(MOCK_FILES),
      "--output",
      `oci:${dir}`,
      REFERENCE,
    ],
    imgmkr: true,
  });
  await removeQuietly(dir);
}

/** Step 6: `--output push` against skopeo copying the same image from an OCI layout. */
async function stepPush(bench: Bench): Promise<void> {
  // Cold: nothing cached, so the layer is built twice (hash, HEAD, then upload).
  const pushSpec = (host: string): RowSpec => ({
    key: "push",
    step: 6,
    label: "imgmkr push (gzip, no cache)",
    argv: [
      ...layerArgs(bench, PUSH_SEED),
      "--no-cache",
      "--output",
      "push",
      `${host}/bench/push:1`,
    ],
    imgmkr: true,
  });
  // Warm: the oci: write below cached the layer's digest; a new repository makes it upload.
  const warmSpec = (host: string): RowSpec => ({
    key: "push-warm",
    step: 6,
    label: "imgmkr push (gzip, warm cache)",
    argv: [...layerArgs(bench, PUSH_SEED), "--output", "push", `${host}/bench/push-warm:1`],
    imgmkr: true,
  });
  const skopeoSpec = (host: string, dir: string): RowSpec => ({
    key: "skopeo",
    step: 6,
    label: "skopeo copy oci: -> registry",
    argv: [
      "skopeo",
      "copy",
      "--dest-tls-verify=false",
      `oci:${dir}:1`,
      `docker://${host}/bench/skopeo:1`,
    ],
  });
  // Each row pushes into a registry of its own: one that already holds the blob (in another
  // repository) ingests it at a different speed, which would favour whichever row came first.
  const withRegistry = async (spec: (host: string) => RowSpec) => {
    let registry: RegistryServer;
    try {
      registry = await startRegistry();
    } catch (e) {
      return skipRow(bench, spec("<registry>"), (e as Error).message);
    }
    try {
      await measure(bench, spec(registry.host));
    } finally {
      await registry.stop();
    }
  };
  await withRegistry(pushSpec);
  const dir = `${bench.tmp}/skopeo-src`;
  const prep = await runImgmkr(bench, [
    ...layerArgs(bench, PUSH_SEED),
    "--output",
    `oci:${dir}`,
    REFERENCE,
  ]);
  if (prep.code !== 0) {
    const why = `writing its OCI layout failed: ${prep.stderr.trim()}`;
    skipRow(bench, skopeoSpec("<registry>", dir), why);
    return skipRow(bench, warmSpec("<registry>"), why);
  }
  await withRegistry((host) => skopeoSpec(host, dir));
  await withRegistry(warmSpec);
}

/** Untimed runs that fill Deno's transpile cache, so the first row is not charged for it. */
async function warmUp(bench: Bench): Promise<void> {
  for (const compression of ["gzip", "zstd"]) {
    const dir = `${bench.tmp}/warm-up`;
    const out = await runImgmkr(bench, [
      "--layer-sizes",
      "1MB",
      "--quiet",
      "--compression",
      compression,
      "--output",
      `oci:${dir}`,
      REFERENCE,
    ]);
    if (out.code !== 0) bench.notes.push(`warm-up (${compression}) failed: ${out.stderr.trim()}`);
    await removeQuietly(dir);
  }
}

function computeRatios(rows: Row[]): Ratio[] {
  const ok = (key: string) =>
    rows.find((r) => r.key === key && r.status === "ok" && r.seconds !== undefined);
  return RATIOS.map((spec) => {
    const of = ok(spec.of);
    const to = ok(spec.to);
    if (!of || !to) return { ...spec };
    const value = spec.time ? of.seconds! / to.seconds! : of.mibPerSec! / to.mibPerSec!;
    const met = spec.goal &&
      (spec.goal.op === ">=" ? value >= spec.goal.value : value <= spec.goal.value);
    return { ...spec, value, met };
  });
}

/** Pads each column to its widest cell; `align` holds one `l` or `r` per column. */
function table(align: string, lines: string[][]): string {
  const widths = lines[0].map((_, i) => Math.max(...lines.map((l) => l[i].length)));
  return lines.map((l) =>
    l.map((c, i) => align[i] === "r" ? c.padStart(widths[i]) : c.padEnd(widths[i])).join("  ")
      .trimEnd()
  ).join("\n");
}

function formatRss(row: Row): string {
  if (row.peakRssMB === undefined) return "-";
  return row.peakRssMB === null ? "n/a" : `${row.peakRssMB.toFixed(1)} MB`;
}

function formatReport(bench: Bench, ratios: Ratio[], header: string[]): string {
  const rows = table("llrrrrl", [
    ["step", "row", "seconds", "rounds", "MiB/s", "peak RSS", "status"],
    ...bench.rows.map((r) => [
      String(r.step),
      r.label,
      r.seconds?.toFixed(3) ?? "-",
      r.samples.map((s) => s.toFixed(2)).join(" ") || "-",
      r.mibPerSec?.toFixed(1) ?? "-",
      formatRss(r),
      r.status,
    ]),
  ]);
  const comparisons = table("lrll", [
    ["ratio", "value", "goal", ""],
    ...ratios.map((r) => [
      r.label,
      r.value === undefined ? "n/a" : `${r.value.toFixed(2)}x`,
      r.goal ? `${r.goal.op} ${r.goal.value}x` : "-",
      r.met === undefined ? "" : r.met ? "met" : "not met",
    ]),
  ]);
  const notes = bench.notes.map((n) => `note: ${n}`);
  return [...header, "", rows, "", comparisons, ...(notes.length ? ["", ...notes] : [])]
    .join("\n");
}

/** The run's context lines: size, machine, versions. */
async function describeRun(bench: Bench): Promise<{ lines: string[]; meta: object }> {
  const docker = await run(["docker", "version", "--format", "{{.Server.Version}}"]).catch(() =>
    undefined
  );
  const start = await runImgmkr(bench, ["--version"]);
  const meta = {
    date: new Date().toISOString(),
    size: bench.sizeText,
    sizeBytes: bench.size,
    rounds: bench.rounds,
    cpus: navigator.hardwareConcurrency,
    deno: Deno.version.deno,
    docker: docker?.code === 0 ? docker.stdout.trim() : null,
    startupSeconds: start.seconds,
  };
  return {
    meta,
    lines: [
      `imgmkr bench: one ${formatSize(bench.size)} layer (${bench.size} bytes), seed ${SEED}, ` +
      `${meta.cpus} CPUs, deno ${meta.deno}, docker ${meta.docker ?? "unreachable"}`,
      `Wall time of whole processes, median of ${bench.rounds} rounds (each round runs every ` +
      `row once); imgmkr start-up (--version) takes ${start.seconds.toFixed(3)} s. ` +
      "MiB/s are of the layer size.",
    ],
  };
}

async function writeResults(meta: object, rows: Row[], ratios: Ratio[]): Promise<void> {
  await Deno.mkdir(`${ROOT}.bench`, { recursive: true });
  await Deno.writeTextFile(RESULTS_FILE, JSON.stringify({ ...meta, rows, ratios }, null, 2) + "\n");
}

/** Runs one step; an unexpected error is noted and the next step runs. */
async function runStep(bench: Bench, step: (bench: Bench) => Promise<void>): Promise<void> {
  try {
    await step(bench);
  } catch (e) {
    if (e instanceof Interrupted) throw e;
    bench.stepErrors++;
    bench.notes.push(`${step.name} threw: ${(e as Error).stack ?? e}`);
    log(`${step.name} threw: ${(e as Error).stack ?? e}`);
  }
}

/** Removes what the run left: its docker tags and its temp dir. Runs after a signal too. */
async function cleanUp(bench: Bench): Promise<void> {
  for (const tag of bench.tags) await rmi(bench, tag, { cleanup: true });
  await removeQuietly(bench.tmp);
}

/** Runs every step; returns the exit code. */
async function main(): Promise<number> {
  const sizeText = (Deno.env.get("BENCH_SIZE") ?? DEFAULT_SIZE).trim();
  let size: number;
  try {
    size = parseSize(sizeText);
  } catch (e) {
    log(`BENCH_SIZE: ${(e as Error).message}`);
    return EXIT_USAGE;
  }
  const roundsText = Deno.env.get("BENCH_ROUNDS") ?? String(DEFAULT_ROUNDS);
  const rounds = Number(roundsText);
  if (!Number.isInteger(rounds) || rounds < 1) {
    log(`BENCH_ROUNDS: '${roundsText}' is not a whole number of at least 1`);
    return EXIT_USAGE;
  }
  const bench: Bench = {
    sizeText,
    size,
    rounds,
    tmp: await Deno.makeTempDir({ prefix: "imgmkr-bench-" }),
    hasTime: await Deno.stat(TIME_BIN).then(() => true, () => false),
    rows: [],
    notes: [],
    stepErrors: 0,
    tags: new Set(),
  };
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => onSignal(signal));
  }
  if (!bench.hasTime) bench.notes.push(`${TIME_BIN} is missing (apt package time): RSS is n/a`);
  let header: string[] = [];
  let meta: object = {};
  try {
    ({ lines: header, meta } = await describeRun(bench));
    await warmUp(bench);
    for (let round = 1; round <= rounds; round++) {
      if (rounds > 1) log(`round ${round} of ${rounds}`);
      for (const step of [stepDd, stepOci, stepEngine, stepDockerLoad, stepMockFs, stepPush]) {
        await runStep(bench, step);
      }
    }
  } catch (e) {
    if (!(e instanceof Interrupted)) throw e;
    bench.notes.push(`${e.message}: the rows after it were not run`);
  } finally {
    await cleanUp(bench);
  }
  const ratios = computeRatios(bench.rows);
  console.log(formatReport(bench, ratios, header));
  await writeResults(meta, bench.rows, ratios);
  console.log(`\nresults: ${RESULTS_FILE}`);
  if (interrupted) return SIGNAL_EXIT[interrupted] ?? 1;
  return bench.stepErrors > 0 || bench.rows.some((r) => r.status === "failed") ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main());
