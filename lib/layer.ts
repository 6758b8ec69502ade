/**
 * Builds one layer blob in a single streaming pass: tar segments, then the
 * compressor, then SHA-256 of the tar (diffID) and of the blob (digest), then
 * every {@linkcode BlobWriter}. Memory stays bounded: each write is awaited
 * before more is generated.
 *
 * @module
 */

import { createHash, type Hash } from "node:crypto";
import type { Segment } from "./content.ts";
import { createCompressor } from "./compress.ts";
import {
  type BlobWriter,
  type Compression,
  type Descriptor,
  layerMediaType,
  type LayerResult,
} from "./oci.ts";
import type { LayerPlan } from "./plan.ts";
import { tarSegmentStream, tarSize } from "./tar.ts";

/** Least number of tar bytes between two progress reports, so tiny files do not flood the callback. */
const PROGRESS_STEP = 1024 * 1024;

/** Options for {@linkcode buildLayer}. */
export interface BuildLayerOptions {
  /** The layer to build. */
  plan: LayerPlan;
  /** The run's seed. */
  seed: number;
  /**
   * Percentage (0–100) of file bytes that are random.
   * @default {100}
   */
  entropy?: number;
  /**
   * Blob compression.
   * @default {"gzip"}
   */
  compression?: Compression;
  /**
   * Compression level; the compression's default when unset.
   * @default {undefined}
   */
  compressionLevel?: number;
  /**
   * Where the blob goes; empty for a hash-only pass, several to tee.
   * @default {[]}
   */
  writers?: BlobWriter[];
  /**
   * gzip Workers (see {@linkcode createCompressor}).
   * @default {undefined}
   */
  workers?: number;
  /**
   * Stops the build promptly when aborted; the build then rejects with the signal's reason.
   * @default {undefined}
   */
  signal?: AbortSignal;
  /**
   * The diffID an earlier pass computed for this layer. The tar is then not
   * hashed again (the blob digest still is, unless `knownDigest` is given);
   * with `compression: "none"` the blob is the tar, so it is hashed unless
   * `knownDigest` is given.
   * @default {undefined}
   */
  knownDiffId?: string;
  /**
   * The blob digest an earlier pass computed, for a destination that checks
   * every byte against it itself (a registry does on the final PUT): the
   * blob is then not hashed again and the result carries this digest. Never
   * for a destination that trusts the digest, such as a layout.
   * @default {undefined}
   */
  knownDigest?: string;
  /**
   * Do not hash the tar at all: for a pass that needs only the blob digest
   * (the one before a registry HEAD), whose diffID a later pass computes. The
   * result's `diffId` is then `""`. Ignored with `compression: "none"`, where
   * the digest is the diffID.
   * @default {false}
   */
  skipDiffId?: boolean;
  /**
   * Called with the number of tar bytes done so far, at least every MiB and at the end.
   * @default {undefined}
   */
  onProgress?: (tarBytesDone: number) => void;
}

/** The media type of a layer blob with this compression. */
export function layerDescriptorMediaType(compression: Compression): string {
  return layerMediaType(compression);
}

/**
 * Builds one layer and streams its blob to every writer, then commits them
 * with the blob's descriptor. On any failure every writer is aborted and
 * the error rethrown.
 */
export async function buildLayer(options: BuildLayerOptions): Promise<LayerResult> {
  const { plan, seed, signal, onProgress } = options;
  const entropy = options.entropy ?? 100;
  const compression = options.compression ?? "gzip";
  const writers = options.writers ?? [];
  let writing: Promise<void> = Promise.resolve();
  try {
    signal?.throwIfAborted();
    const compressor = createCompressor({
      compression,
      level: options.compressionLevel,
      workers: options.workers,
    });
    // Without compression the blob is the tar: one hash (or none) serves as digest and diffID.
    const none = compression === "none";
    const known = none ? options.knownDigest : options.knownDiffId;
    const skipTarHash = known !== undefined || (!none && options.skipDiffId === true);
    const blobHash = none || options.knownDigest !== undefined ? undefined : createHash("sha256");
    // Big tars are generated on a Worker. Where the tar is hashed balances the two threads: a
    // compressed layer's tar on the Worker (this thread hashes the blob), a plain tar here.
    const hashHere = none && !skipTarHash ? createHash("sha256") : undefined;
    const stream = tarSegmentStream(plan, { seed, entropy, hash: !none && !skipTarHash });
    const tar: TarCount = { bytes: 0 };
    let reported = 0;
    const source = countedTar(stream, tar, hashHere, signal);
    let size = 0;
    // A chunk no writer holds on to once written goes back to where it came from (the gzip
    // encoder, or for a plain tar the generator), so buffers are reused, not collected.
    const reusable = writers.every((w) => w.retainsChunks === false);
    const release = none ? stream.release : compressor.release;
    let previous: Uint8Array | undefined;
    for await (const chunk of compressor.compress(source, { release: stream.release })) {
      signal?.throwIfAborted();
      blobHash?.update(chunk);
      size += chunk.length;
      // One write in flight while the next chunk is made: generation overlaps a
      // blocking disk or network write, and memory stays at one chunk.
      await writing;
      if (reusable && previous) release(previous);
      previous = chunk;
      writing = writeAll(writers, chunk);
      writing.catch(() => {}); // awaited before the next write or in the catch below
      if (onProgress && tar.bytes - reported >= PROGRESS_STEP) {
        reported = tar.bytes;
        onProgress(tar.bytes);
      }
    }
    await writing;
    const expected = tarSize(plan);
    if (tar.bytes !== expected) {
      throw new Error(`tar of layer ${plan.index} is ${tar.bytes} bytes, planned ${expected}`);
    }
    const diffId = skipTarHash
      ? known ?? ""
      : hashHere
      ? `sha256:${hashHere.digest("hex")}`
      : stream.digest();
    const digest = blobHash
      ? `sha256:${blobHash.digest("hex")}`
      : none
      ? diffId
      : options.knownDigest!;
    const descriptor: Descriptor = { mediaType: layerMediaType(compression), digest, size };
    signal?.throwIfAborted();
    await allOrFirstError(writers.map((w) => w.commit(descriptor)));
    onProgress?.(tar.bytes);
    return {
      descriptor,
      diffId,
      tarSize: tar.bytes,
      fileBytes: plan.files.reduce((n, f) => n + f.size, 0),
      fileCount: plan.files.length,
    };
  } catch (err) {
    await writing.catch(() => {}); // never abort a writer in the middle of a write
    await Promise.allSettled(writers.map((w) => w.abort()));
    throw err;
  }
}

/** Running count of tar bytes. */
interface TarCount {
  bytes: number;
}

/** Counts (and hashes, if `hash` is given) tar segments before the compressor takes them, checking the signal. */
async function* countedTar(
  segments: AsyncIterable<Segment>,
  count: TarCount,
  hash: Hash | undefined,
  signal: AbortSignal | undefined,
): AsyncGenerator<Segment> {
  for await (const seg of segments) {
    signal?.throwIfAborted();
    hash?.update(seg.bytes);
    count.bytes += seg.bytes.length;
    yield seg;
  }
}

/** Writes a chunk to every writer. */
function writeAll(writers: BlobWriter[], chunk: Uint8Array): Promise<void> {
  if (writers.length === 0) return Promise.resolve();
  if (writers.length === 1) return writers[0].write(chunk);
  return allOrFirstError(writers.map((w) => w.write(chunk)));
}

/** Waits for every promise (so none is still running), then throws the first failure. */
async function allOrFirstError(promises: Promise<void>[]): Promise<void> {
  const results = await Promise.allSettled(promises);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) throw failed.reason;
}
