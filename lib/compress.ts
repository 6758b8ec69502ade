/**
 * Layer compressors over a stream of {@linkcode Segment}s: `none`, `zstd`
 * and a parallel, deterministic `gzip`.
 *
 * The gzip encoder writes ONE standard gzip member. The input is cut into
 * jobs of {@linkcode GZIP_JOB_SIZE} tar bytes at fixed offsets; within a job,
 * random runs become stored deflate blocks (so random blobs grow by only
 * 5 bytes per 64 KiB) and every other run is deflated on its own with a sync
 * flush, so no job refers back into another. Jobs are therefore encoded in
 * parallel Workers, pigz-style, and the output depends only on the tar bytes,
 * their random flags and the level — never on timing or chunking.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import * as zlib from "node:zlib";
import type { Segment } from "./content.ts";
import type { Compression } from "./oci.ts";

/** zlib's default level: on imgmkr's patterns it is both faster and smaller than level 1 (measured). */
export const DEFAULT_GZIP_LEVEL = 6;
/** zstd's own default level. */
export const DEFAULT_ZSTD_LEVEL = 3;
/** Highest zstd level accepted: 20–22 ("ultra") need windows of up to 128 MiB, breaking bounded memory. */
export const MAX_ZSTD_LEVEL = 19;
/** Tar bytes per gzip job: big enough to amortise messaging, small enough to keep memory bounded. */
export const GZIP_JOB_SIZE = 1024 * 1024;
/** Most tar bytes one stored deflate block holds (LEN is 16 bits). */
const MAX_STORED_BLOCK = 65535;
/** Bytes of a stored block's header at a byte boundary: BFINAL/BTYPE byte, LEN, NLEN. */
const STORED_HEADER = 5;
/** gzip header: magic, CM=deflate, no flags, MTIME 0, XFL 0, OS 255 (unknown) as Go writes it. */
const GZIP_HEADER = new Uint8Array([0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
/** An empty stored block with BFINAL=1, ending the deflate stream at a byte boundary. */
const FINAL_BLOCK = new Uint8Array([1, 0, 0, 0xff, 0xff]);
/** Tar bytes encoded inline before Workers are started: small layers are not worth the start-up. */
const INLINE_BYTES = 4 * 1024 * 1024;
/** Output chunks smaller than this are merged, so tar headers never become tiny writes. */
export const MIN_CHUNK_SIZE = 256 * 1024;
/**
 * zstd's output chunk size. Each chunk keeps a buffer of this size alive until
 * it is collected, and compressible output comes in small pieces, so it stays
 * small; `coalesce` merges chunks for the writers (256 KiB chunks here raised
 * the peak RSS of a 4 GiB `--entropy 50` layer from 187 to 206 MB, measured).
 */
const ZSTD_CHUNK_SIZE = 64 * 1024;
/** zlib's output buffer per call: each becomes garbage, so small (zlib's default is 16 KiB). */
const DEFLATE_CHUNK_SIZE = 4096;
/** Most spare job (or output) buffers kept: one per job in flight is plenty. */
const MAX_FREE_BUFFERS = 8;
/**
 * Bytes of a new output buffer: a whole job of random bytes as stored blocks
 * fits with room to spare, so a released buffer fits the next job's output.
 */
const OUT_CAPACITY = GZIP_JOB_SIZE + 64 * 1024;
/** Jobs queued per Worker: enough to keep it busy while the main thread hashes and writes. */
const JOBS_PER_WORKER = 2;
/** Most Workers used by default: beyond that the calling thread (fill, SHA-256) is the bottleneck. */
const MAX_DEFAULT_WORKERS = 4;

/** Options for {@linkcode createCompressor}. */
export interface CompressorOptions {
  /**
   * The compression.
   * @default {"gzip"}
   */
  compression?: Compression;
  /**
   * Level: gzip 0–9, zstd 1–19; ignored for `none`.
   * @default {DEFAULT_GZIP_LEVEL or DEFAULT_ZSTD_LEVEL}
   */
  level?: number;
  /**
   * gzip Workers; 0 encodes everything on the calling thread. One core is left
   * to the calling thread, which generates and hashes (a full core's work).
   * @default {hardwareConcurrency - 1, from 1 to 4}
   */
  workers?: number;
}

/** Options for {@linkcode Compressor.compress}. */
export interface CompressOptions {
  /**
   * Called with a segment's bytes once the compressor no longer reads them
   * (they were copied or consumed), so the source can reuse the buffer. Never
   * called for bytes that become output (no compression).
   * @default {undefined}
   */
  release?: (bytes: Uint8Array) => void;
}

/** Turns a tar segment stream into compressed chunks. */
export interface Compressor {
  /** The compression. */
  readonly compression: Compression;
  /** The level in use (0 for `none`). */
  readonly level: number;
  /**
   * Hands back a chunk this compressor yielded once nothing reads it any
   * more, so its buffer is reused for later output instead of becoming
   * garbage. Optional; a chunk of another origin is ignored.
   */
  release(chunk: Uint8Array): void;
  /**
   * Compresses `source`. The compressor takes ownership of the segments'
   * bytes (it may transfer them to a Worker); the chunks it yields are the
   * caller's. Stopping the iteration early releases every resource.
   */
  compress(
    source: Iterable<Segment> | AsyncIterable<Segment>,
    options?: CompressOptions,
  ): AsyncGenerator<Uint8Array>;
}

/**
 * Makes a compressor.
 *
 * @throws {RangeError} for a level outside the compression's range, or a bad worker count.
 */
export function createCompressor(options: CompressorOptions = {}): Compressor {
  const compression = options.compression ?? "gzip";
  const workers = options.workers ??
    Math.max(1, Math.min((navigator.hardwareConcurrency ?? 2) - 1, MAX_DEFAULT_WORKERS));
  if (!Number.isInteger(workers) || workers < 0) {
    throw new RangeError(`gzip workers must be a whole number of at least 0, got ${workers}`);
  }
  switch (compression) {
    case "none":
      return {
        compression,
        level: 0,
        release: () => {},
        compress: (src) => coalesce(passThrough(src)),
      };
    case "gzip": {
      const level = checkLevel(compression, options.level ?? DEFAULT_GZIP_LEVEL, 0, 9);
      const freeOut: ArrayBuffer[] = [];
      return {
        compression,
        level,
        release: (chunk) => {
          if (
            chunk.byteOffset === 0 && chunk.buffer.byteLength === OUT_CAPACITY &&
            freeOut.length < MAX_FREE_BUFFERS
          ) {
            freeOut.push(chunk.buffer as ArrayBuffer);
          }
        },
        compress: (src, opts) => coalesce(gzipStream(src, level, workers, freeOut, opts?.release)),
      };
    }
    case "zstd": {
      const level = checkLevel(compression, options.level ?? DEFAULT_ZSTD_LEVEL, 1, MAX_ZSTD_LEVEL);
      return {
        compression,
        level,
        release: () => {},
        compress: (src, opts) => coalesce(zstdStream(src, level, opts?.release)),
      };
    }
    default:
      throw new RangeError(
        `Cannot use compression '${compression}': it must be one of gzip, zstd, none`,
      );
  }
}

function checkLevel(compression: Compression, level: number, min: number, max: number): number {
  if (!Number.isInteger(level) || level < min || level > max) {
    throw new RangeError(
      `Cannot use ${compression} compression level ${level}: it must be a whole number from ${min} to ${max}`,
    );
  }
  return level;
}

/** Merges runs of chunks smaller than {@linkcode MIN_CHUNK_SIZE}; large chunks pass as they are. */
async function* coalesce(chunks: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
  let parts: Uint8Array[] = [];
  let pending = 0;
  for await (const chunk of chunks) {
    if (chunk.length === 0) continue;
    if (pending === 0 && chunk.length >= MIN_CHUNK_SIZE) {
      yield chunk;
      continue;
    }
    parts.push(chunk);
    pending += chunk.length;
    if (pending >= MIN_CHUNK_SIZE) {
      yield concat(parts);
      parts = [];
      pending = 0;
    }
  }
  if (pending > 0) yield concat(parts);
}

async function* passThrough(
  source: Iterable<Segment> | AsyncIterable<Segment>,
): AsyncGenerator<Uint8Array> {
  for await (const seg of source) if (seg.bytes.length > 0) yield seg.bytes;
}

async function* zstdStream(
  source: Iterable<Segment> | AsyncIterable<Segment>,
  level: number,
  release: ((bytes: Uint8Array) => void) | undefined,
): AsyncGenerator<Uint8Array> {
  const z = zlib.createZstdCompress({
    params: { [zlib.constants.ZSTD_c_compressionLevel]: level },
    chunkSize: ZSTD_CHUNK_SIZE,
  });
  const drained = () =>
    new Promise<void>((resolve) => {
      const done = () => {
        z.off("drain", done);
        z.off("close", done);
        resolve();
      };
      z.on("drain", done);
      z.on("close", done);
    });
  // Feeds the encoder with backpressure; a segment goes back to the source once zstd has
  // consumed it. Breaking out (the encoder was destroyed) closes the source.
  const feed = (async () => {
    for await (const seg of source) {
      if (z.destroyed) break;
      if (seg.bytes.length === 0) continue;
      const buf = Buffer.from(seg.bytes.buffer, seg.bytes.byteOffset, seg.bytes.length);
      const more = z.write(buf, (err) => {
        if (!err) release?.(seg.bytes);
      });
      if (!more) await drained();
    }
    if (!z.destroyed) z.end();
  })();
  feed.catch((err) => z.destroy(err));
  try {
    for await (const chunk of z) {
      const b = chunk as Buffer;
      yield new Uint8Array(b.buffer, b.byteOffset, b.length);
    }
    await feed;
  } finally {
    z.destroy();
  }
}

/** One gzip job: up to {@linkcode GZIP_JOB_SIZE} contiguous tar bytes and their runs. */
export interface GzipJob {
  /** The tar bytes. */
  data: Uint8Array;
  /** Lengths of consecutive runs; positive = random (stored), negative = deflated. */
  runs: number[];
  /** Deflate level for the non-random runs. */
  level: number;
}

/**
 * Encodes one job as a byte-aligned piece of a deflate stream with no final
 * block and no reference outside itself. Pure: the same job gives the same
 * bytes on any thread. Output of at least {@linkcode MIN_CHUNK_SIZE} bytes
 * goes at the start of `into` when it fits, else into a new buffer of at
 * least {@linkcode OUT_CAPACITY} bytes; smaller output into an exact buffer.
 */
export function encodeGzipJob(job: GzipJob, into?: ArrayBuffer): Uint8Array {
  // Deflate first (small outputs), then write everything into one exact buffer:
  // no per-run garbage piles up in a Worker, whose GC rarely runs.
  const pieces: (Uint8Array | number)[] = [];
  let total = 0;
  let consumed = 0;
  for (const run of job.runs) {
    const len = Math.abs(run);
    if (run > 0 || job.level === 0) {
      pieces.push(len);
      total += len + Math.ceil(len / MAX_STORED_BLOCK) * STORED_HEADER;
    } else {
      const deflated = zlib.deflateRawSync(job.data.subarray(consumed, consumed + len), {
        level: job.level,
        finishFlush: zlib.constants.Z_SYNC_FLUSH,
        chunkSize: DEFLATE_CHUNK_SIZE,
      });
      pieces.push(deflated, len);
      total += deflated.length;
    }
    consumed += len;
  }
  // Only output big enough to reach a writer uncopied (see coalesce) is worth a reusable buffer;
  // small output (patterns deflate to little) gets an exact one and leaves `into` unused.
  const reusable = total >= MIN_CHUNK_SIZE;
  const buffer = reusable && into && into.byteLength >= total
    ? into
    : new ArrayBuffer(reusable ? Math.max(total, OUT_CAPACITY) : total);
  const out = new Uint8Array(buffer, 0, total);
  let inOff = 0;
  let o = 0;
  for (let i = 0; i < pieces.length; i++) {
    const piece = pieces[i];
    if (typeof piece !== "number") {
      out.set(piece, o);
      o += piece.length;
      inOff += pieces[++i] as number; // the deflated run's input length follows it
    } else {
      o = putStoredBlocks(job.data.subarray(inOff, inOff + piece), out, o);
      inOff += piece;
    }
  }
  return out;
}

/** Frames bytes as non-final stored deflate blocks into `out` at `o`; returns the new offset. */
function putStoredBlocks(bytes: Uint8Array, out: Uint8Array, o: number): number {
  for (let i = 0; i < bytes.length; i += MAX_STORED_BLOCK) {
    const n = Math.min(MAX_STORED_BLOCK, bytes.length - i);
    out[o] = 0; // BFINAL=0, BTYPE=00, rest of the byte is padding
    out[o + 1] = n & 0xff;
    out[o + 2] = n >>> 8;
    out[o + 3] = ~n & 0xff;
    out[o + 4] = (~n >>> 8) & 0xff;
    out.set(bytes.subarray(i, i + n), o + STORED_HEADER);
    o += STORED_HEADER + n;
  }
  return o;
}

function concat(parts: Uint8Array[]): Uint8Array {
  if (parts.length === 1) return parts[0];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

/** Collects segments into jobs cut at fixed tar offsets. */
class JobBuilder {
  #data = new Uint8Array(GZIP_JOB_SIZE);
  #len = 0;
  #runs: number[] = [];
  /** Job buffers handed back by Workers, reused so neither side piles up garbage. */
  #free: ArrayBuffer[] = [];
  constructor(readonly level: number) {}

  /** Returns a job's buffer for reuse. */
  recycle(buffer: ArrayBuffer): void {
    if (buffer.byteLength === GZIP_JOB_SIZE && this.#free.length < MAX_FREE_BUFFERS) {
      this.#free.push(buffer);
    }
  }

  /** Appends bytes; returns the jobs that filled up. */
  add(seg: Segment): GzipJob[] {
    const full: GzipJob[] = [];
    let off = 0;
    while (off < seg.bytes.length) {
      const n = Math.min(GZIP_JOB_SIZE - this.#len, seg.bytes.length - off);
      this.#data.set(seg.bytes.subarray(off, off + n), this.#len);
      this.#len += n;
      off += n;
      const signed = seg.random ? n : -n;
      const last = this.#runs.length - 1;
      if (last >= 0 && Math.sign(this.#runs[last]) === Math.sign(signed)) {
        this.#runs[last] += signed;
      } else {
        this.#runs.push(signed);
      }
      if (this.#len === GZIP_JOB_SIZE) full.push(this.take()!);
    }
    return full;
  }

  /** Takes the partial job, if any. */
  take(): GzipJob | undefined {
    if (this.#len === 0) return undefined;
    const job = { data: this.#data.subarray(0, this.#len), runs: this.#runs, level: this.level };
    const reused = this.#free.pop();
    this.#data = reused ? new Uint8Array(reused) : new Uint8Array(GZIP_JOB_SIZE);
    this.#len = 0;
    this.#runs = [];
    return job;
  }
}

/** What a Worker sends back: the encoded job (or an error) and the job's buffer for reuse. */
interface WorkerReply {
  id: number;
  out?: Uint8Array;
  input?: ArrayBuffer;
  /** The spare output buffer, when the output went elsewhere. */
  unused?: ArrayBuffer;
  error?: string;
}

/** A fixed set of encoding Workers; jobs go to the least busy one. */
class WorkerPool {
  #workers: { worker: Worker; pending: Map<number, PromiseWithResolvers<Uint8Array>> }[] = [];
  #recycle: (buffer: ArrayBuffer) => void;
  #nextId = 0;
  #failed?: Error;

  /**
   * @param recycle takes back job buffers.
   * @param unused takes back spare output buffers a job did not need.
   */
  constructor(
    count: number,
    recycle: (buffer: ArrayBuffer) => void,
    unused: (buffer: ArrayBuffer) => void,
  ) {
    this.#recycle = recycle;
    for (let i = 0; i < count; i++) {
      const worker = new Worker(new URL("./compress_worker.ts", import.meta.url), {
        type: "module",
      });
      const pending = new Map<number, PromiseWithResolvers<Uint8Array>>();
      worker.onmessage = (e: MessageEvent<WorkerReply>) => {
        if (e.data.input) this.#recycle(e.data.input);
        if (e.data.unused) unused(e.data.unused);
        const p = pending.get(e.data.id);
        pending.delete(e.data.id);
        if (e.data.out) p?.resolve(e.data.out);
        else p?.reject(new Error(`gzip worker failed: ${e.data.error}`));
      };
      worker.onerror = (e: ErrorEvent) => {
        e.preventDefault();
        this.#fail(new Error(`gzip worker failed: ${e.message}`));
      };
      this.#workers.push({ worker, pending });
    }
  }

  #fail(err: Error): void {
    this.#failed ??= err;
    for (const w of this.#workers) {
      for (const p of w.pending.values()) p.reject(err);
      w.pending.clear();
    }
  }

  /** Encodes a job on a Worker, into `spare` if it fits; both buffers are transferred. */
  run(job: GzipJob, spare?: ArrayBuffer): Promise<Uint8Array> {
    if (this.#failed) return Promise.reject(this.#failed);
    const w = this.#workers.reduce((a, b) => (b.pending.size < a.pending.size ? b : a));
    const id = this.#nextId++;
    const p = Promise.withResolvers<Uint8Array>();
    w.pending.set(id, p);
    const transfer = [job.data.buffer as ArrayBuffer, ...(spare ? [spare] : [])];
    w.worker.postMessage({ id, job, spare }, transfer);
    return p.promise;
  }

  /** Stops every Worker. */
  close(): void {
    for (const w of this.#workers) w.worker.terminate();
    this.#workers = [];
  }
}

async function* gzipStream(
  source: Iterable<Segment> | AsyncIterable<Segment>,
  level: number,
  workerCount: number,
  freeOut: ArrayBuffer[],
  release: ((bytes: Uint8Array) => void) | undefined,
): AsyncGenerator<Uint8Array> {
  const builder = new JobBuilder(level);
  // Encoded jobs (inline) or pending ones (on a Worker), in stream order.
  const queue: (Uint8Array | Promise<Uint8Array>)[] = [];
  let pool: WorkerPool | undefined;
  let crc = 0;
  let size = 0;
  const submit = (job: GzipJob) => {
    crc = zlib.crc32(job.data, crc);
    size += job.data.length;
    if (!pool && workerCount > 0 && size > INLINE_BYTES) {
      pool = new WorkerPool(workerCount, (b) => builder.recycle(b), (b) => freeOut.push(b));
    }
    if (pool) {
      const p = pool.run(job, freeOut.pop());
      p.catch(() => {}); // awaited in order below; never an unhandled rejection meanwhile
      queue.push(p);
    } else {
      const spare = freeOut.pop();
      const out = encodeGzipJob(job, spare);
      if (spare && out.buffer !== spare) freeOut.push(spare);
      queue.push(out);
    }
  };
  const limit = Math.max(1, workerCount) * JOBS_PER_WORKER;
  try {
    yield GZIP_HEADER.slice();
    for await (const seg of source) {
      const jobs = builder.add(seg);
      release?.(seg.bytes); // copied into the job buffers
      for (const job of jobs) submit(job);
      while (queue.length >= limit || queue[0] instanceof Uint8Array) yield await queue.shift()!;
    }
    const last = builder.take();
    if (last) submit(last);
    while (queue.length > 0) yield await queue.shift()!;
    const tail = new Uint8Array(FINAL_BLOCK.length + 8);
    tail.set(FINAL_BLOCK);
    const view = new DataView(tail.buffer);
    view.setUint32(FINAL_BLOCK.length, crc >>> 0, true);
    view.setUint32(FINAL_BLOCK.length + 4, size % 2 ** 32, true); // ISIZE is the size mod 2^32
    yield tail;
  } finally {
    pool?.close();
  }
}
