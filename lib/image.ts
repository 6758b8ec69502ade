/**
 * The native path: build every layer in one streaming pass into the chosen
 * sinks (OCI layout, OCI archive, engine `load`, registry), then write the
 * config, manifests, index and tag. No builder and no temp copy of layer data.
 *
 * @module
 */

import {
  type BuilderName,
  checkDaemon,
  detectBuilder,
  dockerSocket,
  loadCommand,
  LOADERS,
} from "./engine.ts";
import { RegistryError, UsageError } from "./errors.ts";
import { buildLayer } from "./layer.ts";
import type { LayerCache, LayerKeyInput } from "./cache.ts";
import { createLoadSink, createOciArchiveSink } from "./archive.ts";
import { createLayoutSink } from "./layout.ts";
import { tarSize } from "./tar.ts";
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
  BlobMismatchError,
  createRegistrySink,
  pushBlobWithRetry,
  type PushStats,
  type RegistrySink,
  type RegistrySinkOptions,
} from "./registry.ts";
import type { Reference } from "./reference.ts";
import { formatSize } from "./sizes.ts";

/** Where the layer cache lives, for messages. */
const CACHE_HINT = "the layer cache ($XDG_CACHE_HOME/imgmkr/layers or ~/.cache/imgmkr/layers)";
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
  /**
   * Remembers built layers' descriptors, so a push whose main pass would only
   * hash skips that pass for layers built before.
   * @default {undefined (no cache)}
   */
  cache?: LayerCache;
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
  push?: PushStats;
  /** The line printed without --json. */
  printed: string;
}

/** Key that identifies a layer's content, so shared layers are built once. */
function layerKey(plan: LayerPlan): string {
  return plan.files.map((f) => f.key).join("\n");
}

/** The sinks of one run, opened before any layer is built. */
interface Sinks {
  /** Sinks that take the layers of the main pass (layout, archive, and load when uncompressed). */
  local: ImageSink[];
  /** The engine load, if any. */
  load?: ImageSink;
  /** The registry, if pushing. */
  registry?: RegistrySink;
  /** Every sink, for abort. */
  all: ImageSink[];
}

async function openSinks(
  options: NativeOptions,
  loadBuilder: BuilderName | undefined,
): Promise<Sinks> {
  const sinks: Sinks = { local: [], all: [] };
  try {
    for (const o of options.outputs) {
      let sink: ImageSink;
      if (o.kind === "oci") sink = await createLayoutSink({ dir: o.dir });
      else if (o.kind === "oci-archive") sink = await createOciArchiveSink({ file: o.file });
      else if (o.kind === "load") {
        sink = sinks.load = await createLoadSink({
          command: loadCommand(loadBuilder!),
          // docker's own daemon takes the stream straight from imgmkr, without the CLI relaying it.
          socket: loadBuilder === "docker" ? dockerSocket() : undefined,
          platform: options.platforms[0],
        });
      } else {
        sink = sinks.registry = createRegistrySink({
          ...options.registry,
          reference: options.reference,
          retries: options.retries,
        });
      }
      sinks.all.push(sink);
      if (o.kind === "oci" || o.kind === "oci-archive") sinks.local.push(sink);
    }
  } catch (error) {
    await Promise.allSettled(sinks.all.map((s) => s.abort()));
    throw error;
  }
  return sinks;
}

/**
 * Builds the image natively into every output.
 *
 * @throws {UsageError} when `load` has no usable engine or an output path is unusable.
 */
export async function runNative(options: NativeOptions): Promise<NativeSummary> {
  const { progress, signal } = options;
  const onlyLoad = options.outputs.every((o) => o.kind === "load");
  const compression = effectiveCompression(options.outputs, options.compression);
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
  if (compression === "zstd" && options.outputs.some((o) => o.kind === "oci-archive")) {
    progress.warn(
      "docker 20.10 and older cannot load zstd layers from an archive; podman and containerd can",
    );
  }

  const sinks = await openSinks(options, loadBuilder);
  // A docker-archive must know each layer's size before its data: only uncompressed tars.
  const loadInMainPass = sinks.load !== undefined && compression === "none";
  const mainSinks = loadInMainPass ? [...sinks.local, sinks.load!] : sinks.local;
  // Only a registry: the first pass is for the HEADs, which need just the blob digests; the
  // upload pass (or, for a blob the registry has, a tar-only pass) computes the diffIDs. Each
  // layer is then pushed as soon as its digest is known, while others are still being hashed.
  const pushNow = sinks.all.length === 1 ? sinks.registry : undefined;
  try {
    // 1. Layers: one pass per distinct layer into the main sinks (hash-only when there are none).
    const distinct = new Map<string, { plan: LayerPlan; label: string }>();
    options.plans.forEach((plans, p) => {
      for (const plan of plans) {
        const key = layerKey(plan);
        if (distinct.has(key)) continue;
        const label = options.platforms.length > 1
          ? `${formatPlatform(options.platforms[p])} ${plan.root}`
          : plan.root;
        distinct.set(key, { plan, label });
      }
    });
    const entries = [...distinct.entries()];
    const totalBytes = entries.reduce((s, [, v]) => s + v.plan.size, 0);
    progress.stage(
      `Building ${entries.length} layer${entries.length === 1 ? "" : "s"} (${
        formatSize(totalBytes)
      }, ${compression})` +
        (mainSinks.length
          ? ` into ${mainSinks.map((s) => s.name).join(", ")}`
          : pushNow
          ? `, each hashed for its HEAD, then pushed to ${pushNow.name}`
          : ", hashing only"),
    );
    let t = performance.now();
    const results = new Map<string, LayerResult>();
    const fromCache = new Set<string>();
    await mapConcurrent(entries, async ([key, { plan, label }], _i, sig) => {
      const cacheInput: LayerKeyInput = {
        plan,
        seed: options.seed,
        entropy: options.entropy ?? 100,
        compression,
        level: options.compressionLevel,
      };
      // Only a hash-only pass can be skipped: any other pass writes the layer somewhere.
      const cached = mainSinks.length === 0 ? await options.cache?.get(cacheInput) : undefined;
      let r: LayerResult;
      if (cached) {
        progress.info(`${label}: ${cached.descriptor.digest.slice(0, 19)} from the layer cache`);
        fromCache.add(key);
        r = cached;
      } else {
        const size = compression === "none" ? tarSize(plan) : undefined;
        // buildLayer hashes exactly the bytes it writes: the sinks need not hash them again.
        const writers = await Promise.all(
          mainSinks.map((s) =>
            s.createBlob({ mediaType: layerMediaType(compression), size, verify: false })
          ),
        );
        const task = progress.task(
          `${label} (${plural(plan.files.length, "file")})`,
          tarSize(plan),
        );
        r = await buildLayer({
          plan,
          seed: options.seed,
          entropy: options.entropy,
          compression,
          compressionLevel: options.compressionLevel,
          writers,
          // Before a HEAD only the blob digest counts; the upload pass computes the diffID.
          skipDiffId: pushNow !== undefined,
          signal: sig,
          onProgress: fileProgress(task),
        });
        task.done(r.descriptor.digest.slice(0, 19));
      }
      if (pushNow) {
        const entry = { plan, label, result: r, cached: cached !== undefined };
        r = await pushLayer(pushNow, entry, options, compression, sig);
      }
      results.set(key, r);
      if (!cached) await options.cache?.put(cacheInput, r);
    }, { limit: options.maxConcurrent ?? 5, signal });
    lap("layers", t);

    // 2. Configs, manifests, index; then each local output is committed (tagged) last.
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
    for (const sink of sinks.local) {
      await writeMetadata(sink, record);
      await sink.commit(record);
      progress.stage(`Wrote ${sink.name}`);
    }
    lap("write", t);

    // 3. The engine load, with its own uncompressed pass when the main one was compressed.
    if (sinks.load) {
      t = performance.now();
      const loadRecord = loadInMainPass
        ? record
        : await uncompressedPass(sinks.load, images, options);
      await writeMetadata(sinks.load, loadRecord);
      await sinks.load.commit(loadRecord);
      progress.stage(
        `Loaded ${options.reference.name}:${options.reference.tag} into ${loadBuilder}`,
      );
      lap("load", t);
    }

    // 4. The registry: HEAD each blob, upload what is missing (regenerated from the seed), then manifests.
    if (sinks.registry) {
      t = performance.now();
      if (!pushNow) {
        const layers = entries.map(([key, v]) => ({
          ...v,
          result: results.get(key)!,
          cached: fromCache.has(key),
        }));
        await mapConcurrent(
          layers,
          (entry, _i, sig) => pushLayer(sinks.registry!, entry, options, compression, sig),
          { limit: options.maxConcurrent ?? 5, signal: options.signal },
        );
      }
      await writeMetadata(sinks.registry, record);
      await sinks.registry.commit(record);
      progress.stage(`Pushed ${sinks.registry.digestReference ?? options.reference.name}`);
      lap("push", t);
    }
    timings.total = round((performance.now() - started) / 1000);
    return summarize(options, record, timings, sinks.registry, onlyLoad);
  } catch (error) {
    await Promise.allSettled(sinks.all.map((s) => s.abort()));
    throw error;
  }
}

function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function summarize(
  options: NativeOptions,
  record: ImageRecord,
  timings: Record<string, number>,
  registry: RegistrySink | undefined,
  onlyLoad: boolean,
): NativeSummary {
  const { name, tag } = options.reference;
  const digest = record.root.descriptor.digest;
  return {
    reference: `${name}:${tag}`,
    outputs: options.outputs.map(describeOutput),
    digest,
    mediaType: record.root.descriptor.mediaType,
    manifests: record.images.map((img) => ({
      platform: formatPlatform(img.platform),
      digest: img.manifest.descriptor.digest,
      config: img.config.descriptor.digest,
    })),
    layers: record.images.flatMap((img) =>
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
    ),
    seed: options.seed,
    timings,
    push: registry?.stats,
    printed: onlyLoad ? `${name}:${tag}` : `${name}@${digest}`,
  };
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
  const missing = layers.findIndex((l) => !l.diffId);
  if (missing >= 0) throw new Error(`layer ${plans[missing].index} has no diffID yet`);
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
    const first = img.layers[plan.index - 1];
    const w: BlobWriter = await sink.createBlob({
      mediaType: MediaType.Layer,
      size: first.tarSize,
      verify: false,
    });
    layers.push(
      await buildLayer({
        plan,
        seed: options.seed,
        entropy: options.entropy,
        compression: "none",
        writers: [w],
        // The first pass hashed this tar; the engine checks every layer against its diffID.
        knownDigest: first.diffId,
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

/** A layer to push: its first pass's result, whose diffId may still be "". */
interface PushEntry {
  plan: LayerPlan;
  label: string;
  result: LayerResult;
  cached: boolean;
}

/**
 * HEADs a layer and uploads it if missing. A streamed upload that
 * breaks is regenerated from the seed and sent again (with backoff and
 * `Retry-After`) by {@linkcode pushBlobWithRetry}, which also checks that
 * every attempt has the digest of the first pass. A diffID the first pass
 * left out is computed by the upload pass, or for a blob the registry
 * already has, by a pass over the tar alone.
 *
 * @returns the layer's result with its diffID.
 */
async function pushLayer(
  sink: RegistrySink,
  entry: PushEntry,
  options: NativeOptions,
  compression: Compression,
  sig: AbortSignal,
): Promise<LayerResult> {
  const { plan, label, result, cached } = entry;
  let diffId = result.diffId;
  const pushed = pushBlobWithRetry(sink, async (writer) => {
    const task = options.progress.task(`push ${label}`, tarSize(plan));
    const built = await buildLayer({
      plan,
      seed: options.seed,
      entropy: options.entropy,
      compression,
      compressionLevel: options.compressionLevel,
      knownDiffId: diffId || undefined,
      // The registry checks every byte against the digest on the final PUT (a mismatch is
      // DIGEST_INVALID): hashing the blob here too would take CPU the registry needs.
      knownDigest: result.descriptor.digest,
      // pushBlobWithRetry commits the blob once it has checked the digest.
      writers: [uncommitted(writer)],
      signal: sig,
      onProgress: fileProgress(task),
    });
    task.done();
    diffId = built.diffId;
    return built.descriptor;
  }, {
    mediaType: result.descriptor.mediaType,
    expected: result.descriptor,
    retries: options.retries,
    onSkipped: () =>
      options.progress.info(
        `${label}: ${result.descriptor.digest.slice(0, 19)} already in the registry, skipped`,
      ),
    onRetry: (attempt, err) =>
      options.progress.warn(
        `${label}: upload failed (${err.cause.message}); regenerating and retrying (${attempt}/${
          options.retries ?? sink.retries
        })`,
      ),
  });
  try {
    await pushed;
  } catch (err) {
    // A digest that differs from a cached one points at the cache, not at the content. The
    // registry finds it (DIGEST_INVALID), or our own check does when a size differs.
    const mismatch = err instanceof BlobMismatchError ||
      (err instanceof RegistryError && err.code === "DIGEST_INVALID");
    if (!cached || !mismatch) throw err;
    throw new Error(
      `${label}: ${(err as Error).message}; the digest came from the layer cache: ` +
        `run again with --no-cache, or delete ${CACHE_HINT}`,
      { cause: err },
    );
  }
  if (!diffId) {
    // Skipped by the HEAD before any upload pass: the diffID needs the tar itself.
    const task = options.progress.task(`diffID ${label}`, tarSize(plan));
    const tar = await buildLayer({
      plan,
      seed: options.seed,
      entropy: options.entropy,
      compression: "none",
      signal: sig,
      onProgress: fileProgress(task),
    });
    task.done(tar.diffId.slice(0, 19));
    diffId = tar.diffId;
  }
  return { ...result, diffId };
}

/** A view of `writer` whose commit does nothing, for a producer whose caller commits. */
function uncommitted(writer: BlobWriter): BlobWriter {
  return {
    retainsChunks: writer.retainsChunks,
    write: (chunk) => writer.write(chunk),
    commit: () => Promise.resolve(),
    abort: () => writer.abort(),
  };
}

/**
 * The compression layers really get: engines store layers uncompressed, so
 * a `load` on its own needs no compression at all.
 */
export function effectiveCompression(
  outputs: readonly NativeOutput[],
  requested: Compression = "gzip",
): Compression {
  return outputs.every((o) => o.kind === "load") ? "none" : requested;
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
