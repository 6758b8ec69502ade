/**
 * The Dockerfile path: write every layer's files into a private build
 * directory, write a `FROM scratch` Dockerfile with one `ADD` per layer, run
 * the builder, and remove the directory on every path out.
 *
 * @module
 */

import { statfsSync } from "node:fs";
import { fileSegments } from "./content.ts";
import { type BuilderName, buildImage, imageId } from "./engine.ts";
import type { LayerPlan } from "./plan.ts";
import { mapConcurrent } from "./pool.ts";
import type { Progress, ProgressTask } from "./progress.ts";
import { formatSize } from "./sizes.ts";

/** Prefix of build directories, so leftovers are easy to spot (and to test for). */
export const BUILD_DIR_PREFIX = "imgmkr-build-";
/** Headroom over the file bytes for directories, the Dockerfile and filesystem overhead. */
const DISK_HEADROOM_BYTES = 16 * 1024 * 1024;

/** Timestamp given to every generated file and directory, so builds are reproducible. */
const FIXED_MTIME = 0;

/**
 * The Dockerfile for a plan: `FROM scratch` plus one `ADD` per layer, in order.
 * Each layer's context dir `layerN/` holds the image's `layerN/` directory, so
 * `ADD layerN /` copies that directory with its fixed mtime: docker would give
 * a destination it creates itself (`ADD layerN /layerN/`) the build's time,
 * and the same seed would then give different diff IDs.
 */
export function dockerfileFor(plans: readonly LayerPlan[]): string {
  return ["FROM scratch", ...plans.map((p) => `ADD ${p.root} /`)].join("\n") + "\n";
}

/** Options for {@linkcode createBuildDir}. */
export interface CreateBuildDirOptions {
  /** Parent directory (`--tmpdir-prefix`). */
  parent: string;
  /** Bytes that will be written, checked against the free space first. */
  bytes: number;
}

/**
 * Creates `<parent>/imgmkr-build-<random>` with mode 0700.
 *
 * @throws {RangeError} when the filesystem has too little free space.
 */
export async function createBuildDir(options: CreateBuildDirOptions): Promise<string> {
  const need = options.bytes + DISK_HEADROOM_BYTES;
  const free = freeBytes(options.parent);
  if (free !== undefined && free < need) {
    throw new RangeError(
      `Not enough disk space in --tmpdir-prefix ${options.parent}: the layers need ${
        formatSize(need)
      } ` +
        `but only ${
          formatSize(free)
        } is free; free some space or point --tmpdir-prefix at a larger disk`,
    );
  }
  const dir = await Deno.makeTempDir({ dir: options.parent, prefix: BUILD_DIR_PREFIX });
  await Deno.chmod(dir, 0o700);
  return dir;
}

/** Free bytes for unprivileged users on the filesystem holding `path`, if known. */
export function freeBytes(path: string): number | undefined {
  try {
    const s = statfsSync(path);
    return Number(s.bavail) * Number(s.bsize);
  } catch {
    return undefined;
  }
}

/** Options for {@linkcode writeLayerFiles}. */
export interface WriteLayerFilesOptions {
  /** The layers to write. */
  plans: readonly LayerPlan[];
  /** Directory to write into (the build context). */
  dir: string;
  /** The run's seed. */
  seed: number;
  /**
   * Percentage of random bytes.
   * @default {100}
   */
  entropy?: number;
  /**
   * Layers written at once.
   * @default {5}
   */
  maxConcurrent?: number;
  /**
   * Stops writing when aborted.
   * @default {undefined}
   */
  signal?: AbortSignal;
  /**
   * Called as bytes are written, per layer index.
   * @default {undefined}
   */
  onProgress?: (layer: LayerPlan, bytes: number) => void;
  /**
   * Called when a layer is complete.
   * @default {undefined}
   */
  onLayerDone?: (layer: LayerPlan) => void;
}

/**
 * Writes every planned file (real, non-sparse bytes) under `dir/layerN/`,
 * layers concurrently, with fixed mtimes. The first failure stops the other writers.
 *
 * @throws {Error} with the path and, for a full disk, the fix.
 */
export async function writeLayerFiles(options: WriteLayerFilesOptions): Promise<void> {
  await mapConcurrent(options.plans, async (plan, _i, signal) => {
    const base = `${options.dir}/${plan.root}`;
    for (const d of plan.dirs) await Deno.mkdir(`${base}/${d}`, { recursive: true });
    for (const file of plan.files) {
      const path = `${base}/${file.path}`;
      const f = await Deno.open(path, { write: true, createNew: true, mode: 0o644 });
      try {
        for (
          const seg of fileSegments(file.size, {
            seed: options.seed,
            key: file.key,
            entropy: options.entropy,
          })
        ) {
          signal.throwIfAborted();
          let off = 0;
          while (off < seg.bytes.length) off += await f.write(seg.bytes.subarray(off));
          options.onProgress?.(plan, seg.bytes.length);
        }
      } catch (error) {
        if (isNoSpace(error)) {
          throw new Error(
            `No space left on device while writing ${path}: free disk space or point --tmpdir-prefix at a larger disk`,
            { cause: error },
          );
        }
        throw error;
      } finally {
        f.close();
      }
      await Deno.utime(path, FIXED_MTIME, FIXED_MTIME);
    }
    // Directories last, deepest first: creating entries changes a directory's mtime.
    for (const d of [...plan.dirs].reverse()) {
      await Deno.utime(`${base}/${d}`, FIXED_MTIME, FIXED_MTIME);
    }
    options.onLayerDone?.(plan);
  }, { limit: options.maxConcurrent ?? 5, signal: options.signal });
}

function isNoSpace(error: unknown): boolean {
  return error instanceof Error &&
    /ENOSPC|No space left/i.test(`${error.message} ${(error as { code?: string }).code ?? ""}`);
}

/** Options for {@linkcode runBuild}. */
export interface RunBuildOptions {
  /** The layers. */
  plans: readonly LayerPlan[];
  /** The run's seed. */
  seed: number;
  /**
   * Percentage of random bytes.
   * @default {100}
   */
  entropy?: number;
  /** The builder, already checked. */
  builder: BuilderName;
  /** `name:tag`. */
  tag: string;
  /**
   * Platform passed to the build.
   * @default {"linux/amd64"}
   */
  platform?: string;
  /** Parent of the build dir. */
  tmpdirPrefix: string;
  /**
   * Layers written at once.
   * @default {5}
   */
  maxConcurrent?: number;
  /**
   * Ctrl-C and friends.
   * @default {undefined}
   */
  signal?: AbortSignal;
  /** Status output. */
  progress: Progress;
}

/** What the Dockerfile path did. */
export interface BuildResult {
  /** Image ID reported by the builder after the build. */
  imageId?: string;
  /** Seconds spent per stage. */
  timings: { generate: number; build: number; cleanup: number };
}

/**
 * Generates the files, writes the Dockerfile, builds and tags the image, and
 * removes the build dir on every path (success, failure, interrupt).
 */
export async function runBuild(options: RunBuildOptions): Promise<BuildResult> {
  const { progress, plans } = options;
  const total = plans.reduce((s, p) => s + p.size, 0);
  const dir = await createBuildDir({ parent: options.tmpdirPrefix, bytes: total });
  const timings = { generate: 0, build: 0, cleanup: 0 };
  try {
    progress.stage(
      `Generating ${plans.length} layer${plans.length === 1 ? "" : "s"} (${
        formatSize(total)
      }) in ${dir}`,
    );
    let t = performance.now();
    const tasks = new Map<LayerPlan, ProgressTask>();
    await writeLayerFiles({
      plans,
      dir,
      seed: options.seed,
      entropy: options.entropy,
      maxConcurrent: options.maxConcurrent,
      signal: options.signal,
      onProgress: (plan, bytes) => {
        let task = tasks.get(plan);
        if (!task) {
          tasks.set(
            plan,
            task = progress.task(
              `${plan.root} (${plan.files.length} file${plan.files.length === 1 ? "" : "s"})`,
              plan.size,
            ),
          );
        }
        task.advance(bytes);
      },
      onLayerDone: (plan) => tasks.get(plan)?.done(),
    });
    timings.generate = (performance.now() - t) / 1000;
    const dockerfile = dockerfileFor(plans);
    await Deno.writeTextFile(`${dir}/Dockerfile`, dockerfile);
    progress.stage("Wrote Dockerfile");
    for (const line of dockerfile.trimEnd().split("\n")) progress.info(line);
    options.signal?.throwIfAborted();
    progress.stage(
      `Building ${options.tag} with ${options.builder} for ${options.platform ?? "linux/amd64"}`,
    );
    t = performance.now();
    await buildImage({
      builder: options.builder,
      contextDir: dir,
      tag: options.tag,
      platform: options.platform,
      signal: options.signal,
      onOutput: (text) => progress.passthrough(text),
    });
    options.signal?.throwIfAborted();
    timings.build = (performance.now() - t) / 1000;
    return { imageId: await imageId(options.builder, options.tag), timings };
  } finally {
    const t = performance.now();
    progress.stage(`Cleaning up ${dir}`);
    await Deno.remove(dir, { recursive: true });
    timings.cleanup = (performance.now() - t) / 1000;
  }
}

/** Text of `--dry-run` for the Dockerfile path: every layer's files, then the Dockerfile. */
export function describePlan(plans: readonly LayerPlan[]): string {
  const lines: string[] = [];
  for (const p of plans) {
    lines.push(
      `layer ${p.index}: ${formatSize(p.size)} (${p.size} bytes) in ${p.files.length} file${
        p.files.length === 1 ? "" : "s"
      }, ${p.dirs.length} dir${p.dirs.length === 1 ? "" : "s"}`,
    );
    for (const f of p.files) lines.push(`  ${String(f.size).padStart(14)}  /${f.path}`);
  }
  lines.push("", "Dockerfile:", dockerfileFor(plans));
  return lines.join("\n");
}
