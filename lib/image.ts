/**
 * The native path: build every layer in one streaming pass into the chosen
 * sinks (OCI layout, OCI archive, engine `load`, registry), then write the
 * config, manifests, index and tag. No builder and no temp copy of layer data.
 *
 * @module
 */

import { type BuilderName, checkDaemon, detectBuilder, loadCommand, LOADERS } from "./engine.ts";
import { UsageError } from "./errors.ts";
import { buildLayer } from "./layer.ts";
import { createLayoutSink, createLoadSink, createOciArchiveSink } from "./layout.ts";
import {
  type Blob,
  type BlobWriter,
  type BuiltImage,
  type Compression,
  formatPlatform,
  type ImageRecord,
  type ImageSink,
  jsonBlob,
  layerMediaType,
  type LayerResult,
  MediaType,
  type Platform,
} from "./oci.ts";
import type { LayerPlan } from "./plan.ts";
import { mapConcurrent } from "./pool.ts";
import type { Progress } from "./progress.ts";
import {
  createRegistrySink,
  isRetryableBlobError,
  type RegistrySinkOptions,
  type RegistryStats,
} from "./registry.ts";
import type { Reference } from "./reference.ts";
import { formatSize } from "./sizes.ts";

/** Timestamp written into configs: fixed, so the same seed gives the same digests. */
const EPOCH = "1970-01-01T00:00:00Z";

/** A native destination. */
export type NativeOutput =
  | { kind: "oci"; dir: string }
  | { kind: "oci-archive"; file: string }
  | { kind: "load" }
  | { kind: "push" };

/** Options for {@linkcode runNative}. */
export interface NativeOptions {
  /** The image reference. */
  reference: Reference;
  /** Target platforms, in order. */
  platforms: Platform[];
  /** Layer plans, one list per platform. */
  plans: LayerPlan[][];
  /** The run's seed. */
  seed: number;
  /**
   * Percentage of random bytes.
   * @default {100}
   */
  entropy?: number;
  /**
   * Layer compression.
   * @default {"gzip"}
   */
  compression?: Compression;
  /**
   * Compression level.
   * @default {the compressor's default}
   */
  compressionLevel?: number;
  /** Destinations. */
  outputs: NativeOutput[];
  /**
   * Layers built at once.
   * @default {5}
   */
  maxConcurrent?: number;
  /**
   * Builder for `load` (finch-first detection when unset).
   * @default {undefined}
   */
  builder?: BuilderName;
  /**
   * Registry options for `push`, minus the reference.
   * @default {{}}
   */
  registry?: Omit<RegistrySinkOptions, "reference">;
  /**
   * Retries per blob for `push`.
   * @default {3}
   */
  retries?: number;
  /** Words describing how the image was made, for the config's history. */
  createdBy: string;
  /**
   * Ctrl-C and friends.
   * @default {undefined}
   */
  signal?: AbortSignal;
  /** Status output. */
  progress: Progress;
}

/** Per-layer figures of the JSON summary. */
export interface LayerSummary {
  /** Platform of the image holding the layer. */
  platform: string;
  /** 1-based index. */
  index: number;
  /** Blob digest. */
  digest: string;
  /** `sha256:` of the uncompressed tar. */
  diffId: string;
  /** Blob media type. */
  mediaType: string;
  /** Blob size. */
  compressedSize: number;
  /** Uncompressed tar size. */
  tarSize: number;
  /** Sum of file sizes. */
  fileBytes: number;
  /** Number of files. */
  fileCount: number;
}

/** The `--json` summary of a native run. */
export interface NativeSummary {
  /** `name:tag`. */
  reference: string;
  /** The outputs written. */
  outputs: string[];
  /** Digest of the root (manifest, or index for several platforms). */
  digest: string;
  /** Media type of the root. */
  mediaType: string;
  /** Per platform: manifest and config digests. */
  manifests: { platform: string; digest: string; config: string }[];
  /** Every layer. */
  layers: LayerSummary[];
  /** The seed. */
  seed: number;
  /** Seconds per stage. */
  timings: Record<string, number>;
  /** Push figures, when pushing. */
  push?: RegistryStats;
  /** The line printed without --json. */
  printed: string;
}

/** Key that identifies a layer's content, so shared layers are built once. */
function layerKey(plan: LayerPlan): string {
  return plan.files.map((f) => f.key).join("\n");
}

/**
 * Builds the image natively into every output.
 *
 * @throws {UsageError} when `load` has no usable engine.
 */
export async function runNative(options: NativeOptions): Promise<NativeSummary> {
  const { progress, signal } = options;
  const compression = options.compression ?? "gzip";
  const timings: Record<string, number> = {};
  const started = performance.now();
  const lap = (name: string, since: number) =>
    timings[name] = round((performance.now() - since) / 1000);

  let loadBuilder: BuilderName | undefined;
  if (options.outputs.some((o) => o.kind === "load")) {
    try {
      loadBuilder = detectBuilder({ requested: options.builder, among: LOADERS });
      loadCommand(loadBuilder);
    } catch (e) {
      throw new UsageError((e as Error).message, { hint: "run 'imgmkr --help' for usage" });
    }
    progress.stage(`Checking ${loadBuilder}`);
    await checkDaemon(loadBuilder, { signal });
  }

  const local: ImageSink[] = [];
  let loadSink: ImageSink | undefined;
  let registry: ReturnType<typeof createRegistrySink> | undefined;
  for (const o of options.outputs) {
    if (o.kind === "oci") local.push(createLayoutSink({ dir: o.dir }));
    else if (o.kind === "oci-archive") local.push(createOciArchiveSink({ file: o.file }));
    else if (o.kind === "load") loadSink = createLoadSink({ command: loadCommand(loadBuilder!) });
    else registry = createRegistrySink({ ...options.registry, reference: options.reference });
  }
  // Engines store layers uncompressed; a docker-archive must know each size up front.
  const loadJoinsMain = loadSink !== undefined && compression === "none";
  if (loadJoinsMain) local.push(loadSink!);
  const all: ImageSink[] = [
    ...local,
    ...(loadSink && !loadJoinsMain ? [loadSink] : []),
    ...(registry ? [registry.sink] : []),
  ];

  try {
    // 1. Layers: one pass per distinct layer into the local sinks (hash-only when there are none).
    const distinct = new Map<string, { plan: LayerPlan; label: string }>();
    options.plans.forEach((plans, p) =>
      plans.forEach((plan) => {
        const key = layerKey(plan);
        if (!distinct.has(key)) {
          const label = options.platforms.length > 1 && !distinct.has(key)
            ? `${formatPlatform(options.platforms[p])} ${plan.root}`
            : plan.root;
          distinct.set(key, { plan, label });
        }
      })
    );
    const entries = [...distinct.entries()];
    const totalBytes = entries.reduce((s, [, v]) => s + v.plan.size, 0);
    progress.stage(
      `Building ${entries.length} layer${entries.length === 1 ? "" : "s"} (${
        formatSize(totalBytes)
      }, ${compression})` +
        (local.length ? ` into ${local.map((s) => s.name).join(", ")}` : " (hashing)"),
    );
    let t = performance.now();
    const results = new Map<string, LayerResult>();
    await mapConcurrent(entries, async ([key, { plan, label }], _i, sig) => {
      const writers = await Promise.all(
        local.map((s) => s.createBlob({ mediaType: layerMediaType(compression) })),
      );
      const task = progress.task(
        `${label} (${plan.files.length} file${plan.files.length === 1 ? "" : "s"})`,
        plan.size,
      );
      const r = await buildLayer({
        plan,
        seed: options.seed,
        entropy: options.entropy,
        compression,
        compressionLevel: options.compressionLevel,
        writers,
        signal: sig,
        onProgress: fileProgress(task),
      });
      task.done(r.descriptor.digest.slice(0, 19));
      results.set(key, r);
    }, { limit: options.maxConcurrent ?? 5, signal });
    lap("layers", t);

    // 2. Configs, manifests, index.
    const images: BuiltImage[] = options.platforms.map((platform, p) => {
      const layers = options.plans[p].map((plan) => results.get(layerKey(plan))!);
      return assembleImage(platform, options.plans[p], layers, options);
    });
    const root = rootBlob(images);
    const record: ImageRecord = {
      tag: options.reference.tag,
      name: options.reference.name,
      root,
      images,
    };
    t = performance.now();
    for (const sink of local) {
      if (sink === loadSink) continue;
      await writeMetadata(sink, record);
      await sink.commit(record);
      progress.stage(`Wrote ${sink.name}`);
    }
    lap("write", t);

    // 3. The engine load, when it needs its own uncompressed pass.
    if (loadSink) {
      t = performance.now();
      const loadRecord = loadJoinsMain ? record : await uncompressedPass(loadSink, images, options);
      await writeMetadata(loadSink, loadRecord);
      await loadSink.commit(loadRecord);
      progress.stage(
        `Loaded ${options.reference.name}:${options.reference.tag} into ${loadBuilder}`,
      );
      lap("load", t);
    }

    // 4. The registry: HEAD each blob, upload what is missing (regenerated from the seed), then manifests.
    if (registry) {
      t = performance.now();
      await pushLayers(
        registry.sink,
        entries.map(([key, v]) => ({ plan: v.plan, label: v.label, result: results.get(key)! })),
        options,
        compression,
      );
      await writeMetadata(registry.sink, record);
      await registry.sink.commit(record);
      progress.stage(`Pushed ${options.reference.name}:${options.reference.tag}`);
      lap("push", t);
    }
    timings.total = round((performance.now() - started) / 1000);

    const layers: LayerSummary[] = images.flatMap((img) =>
      img.layers.map((l, i) => ({
        platform: formatPlatform(img.platform),
        index: i + 1,
        digest: l.descriptor.digest,
        diffId: l.diffId,
        mediaType: l.descriptor.mediaType,
        compressedSize: l.descriptor.size,
        tarSize: l.tarSize,
        fileBytes: l.fileBytes,
        fileCount: l.fileCount,
      }))
    );
    const onlyLoad = options.outputs.every((o) => o.kind === "load");
    return {
      reference: `${options.reference.name}:${options.reference.tag}`,
      outputs: options.outputs.map(describeOutput),
      digest: root.descriptor.digest,
      mediaType: root.descriptor.mediaType,
      manifests: images.map((img) => ({
        platform: formatPlatform(img.platform),
        digest: img.manifest.descriptor.digest,
        config: img.config.descriptor.digest,
      })),
      layers,
      seed: options.seed,
      timings,
      push: registry?.stats(),
      printed: onlyLoad
        ? `${options.reference.name}:${options.reference.tag}`
        : `${options.reference.name}@${root.descriptor.digest}`,
    };
  } catch (error) {
    await Promise.allSettled(all.map((s) => s.abort()));
    throw error;
  }
}

function round(n: number): number {
  return Math.round(n * 1000) / 1000;
}

/** Progress callback for buildLayer, which reports the running total of tar bytes. */
function fileProgress(task: { advance(n: number): void }): (done: number) => void {
  let last = 0;
  return (done) => {
    task.advance(done - last);
    last = done;
  };
}

function describeOutput(o: NativeOutput): string {
  return o.kind === "oci"
    ? `oci:${o.dir}`
    : o.kind === "oci-archive"
    ? `oci-archive:${o.file}`
    : o.kind;
}

/** Makes the config and manifest of one platform's image. */
function assembleImage(
  platform: Platform,
  plans: LayerPlan[],
  layers: LayerResult[],
  options: NativeOptions,
): BuiltImage {
  const config = jsonBlob(MediaType.Config, {
    created: EPOCH,
    architecture: platform.architecture,
    os: platform.os,
    ...(platform.variant ? { variant: platform.variant } : {}),
    config: {},
    rootfs: { type: "layers", diff_ids: layers.map((l) => l.diffId) },
    history: plans.map((plan) => ({
      created: EPOCH,
      created_by: `imgmkr: layer ${plan.index}, ${formatSize(plan.size)} (${plan.size} bytes) in ` +
        (plan.mockFs ? `a mock root filesystem of ${plan.files.length} files` : "one file") +
        `, seed ${options.seed}, entropy ${options.entropy ?? 100}`,
      comment: options.createdBy,
    })),
  });
  const manifest = jsonBlob(MediaType.Manifest, {
    schemaVersion: 2,
    mediaType: MediaType.Manifest,
    config: config.descriptor,
    layers: layers.map((l) => l.descriptor),
  });
  return { platform, manifest, config, layers };
}

/** The manifest for one platform, or an index of them for several. */
function rootBlob(images: BuiltImage[]): Blob {
  if (images.length === 1) return images[0].manifest;
  return jsonBlob(MediaType.Index, {
    schemaVersion: 2,
    mediaType: MediaType.Index,
    manifests: images.map((img) => ({ ...img.manifest.descriptor, platform: img.platform })),
  });
}

/** Configs, then manifests (the root last, through commit). */
async function writeMetadata(sink: ImageSink, record: ImageRecord): Promise<void> {
  const seen = new Set<string>();
  for (const img of record.images) {
    if (!seen.has(img.config.descriptor.digest)) await sink.putBlob(img.config);
    seen.add(img.config.descriptor.digest);
  }
  if (record.images.length > 1) {
    for (const img of record.images) {
      await sink.putBlob(img.manifest);
    }
  }
}

/** Builds uncompressed layers for an engine load and returns the matching record. */
async function uncompressedPass(
  sink: ImageSink,
  images: BuiltImage[],
  options: NativeOptions,
): Promise<ImageRecord> {
  const img = images[0];
  const layers: LayerResult[] = [];
  for (const plan of options.plans[0]) {
    options.signal?.throwIfAborted();
    const w: BlobWriter = await sink.createBlob({
      mediaType: MediaType.Layer,
      size: img.layers[plan.index - 1].tarSize,
    });
    layers.push(
      await buildLayer({
        plan,
        seed: options.seed,
        entropy: options.entropy,
        compression: "none",
        writers: [w],
        signal: options.signal,
      }),
    );
  }
  const rebuilt = assembleImage(img.platform, options.plans[0], layers, options);
  return {
    tag: options.reference.tag,
    name: options.reference.name,
    root: rebuilt.manifest,
    images: [rebuilt],
  };
}

/** HEADs each layer and uploads the missing ones, regenerating and retrying failed uploads. */
async function pushLayers(
  sink: ImageSink,
  layers: { plan: LayerPlan; label: string; result: LayerResult }[],
  options: NativeOptions,
  compression: Compression,
): Promise<void> {
  const retries = options.retries ?? 3;
  await mapConcurrent(layers, async ({ plan, label, result }, _i, sig) => {
    if (await sink.has(result.descriptor)) {
      options.progress.info(
        `${label}: ${result.descriptor.digest.slice(0, 19)} already in the registry, skipped`,
      );
      return;
    }
    for (let attempt = 0;; attempt++) {
      const task = options.progress.task(`push ${label}`, plan.size);
      try {
        const w = await sink.createBlob({ mediaType: result.descriptor.mediaType });
        const again = await buildLayer({
          plan,
          seed: options.seed,
          entropy: options.entropy,
          compression,
          compressionLevel: options.compressionLevel,
          writers: [w],
          signal: sig,
          onProgress: fileProgress(task),
        });
        if (again.descriptor.digest !== result.descriptor.digest) {
          throw new Error(
            `${label}: regenerated layer has digest ${again.descriptor.digest}, expected ${result.descriptor.digest}; this is a bug, please report it`,
          );
        }
        task.done();
        return;
      } catch (error) {
        if (attempt < retries && isRetryableBlobError(error) && !sig.aborted) {
          options.progress.warn(
            `${label}: upload failed (${(error as Error).message}); regenerating and retrying (${
              attempt + 1
            }/${retries})`,
          );
          continue;
        }
        throw error;
      }
    }
  }, { limit: options.maxConcurrent ?? 5, signal: options.signal });
}

/** Text of `--dry-run` for native outputs. */
export function describeNativePlan(
  platforms: Platform[],
  plans: LayerPlan[][],
  compression: Compression,
): string {
  const lines: string[] = [];
  platforms.forEach((platform, p) => {
    lines.push(`platform ${formatPlatform(platform)}:`);
    for (const plan of plans[p]) {
      lines.push(
        `  layer ${plan.index}: ${
          formatSize(plan.size)
        } (${plan.size} bytes) in ${plan.files.length} file${plan.files.length === 1 ? "" : "s"}, ${
          layerMediaType(compression)
        }`,
      );
      for (const f of plan.files) lines.push(`    ${String(f.size).padStart(14)}  /${f.path}`);
    }
  });
  return lines.join("\n") + "\n";
}
