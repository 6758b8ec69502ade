/**
 * Deterministic streaming tar writer for a {@linkcode LayerPlan}.
 *
 * Entries come in byte order of their paths (every directory before its
 * children), with mtime 0, uid/gid 0, empty user and group names, mode 0755
 * for directories and 0644 for files, in ustar format. Paths longer than the
 * 100-byte name field and sizes beyond the 11-digit octal size field get a
 * PAX extended header, as Go's `archive/tar` writes them.
 *
 * @module
 */

import { createHash } from "node:crypto";
import { fileSegments, repeatedSegmentLengths, type Segment } from "./content.ts";
import { compareBytes, type LayerPlan } from "./plan.ts";

/** Tar block size: headers and data are padded to whole blocks. */
export const BLOCK_SIZE = 512;
/** Length of the ustar `name` field. */
const NAME_LENGTH = 100;
/** Largest size the 11-digit octal `size` field holds (8 GiB - 1). */
export const MAX_USTAR_SIZE = 0o77777777777;
/** The end of an archive: two zero blocks. */
const END_OF_ARCHIVE = 2 * BLOCK_SIZE;
/** Directory permissions, as a typical image build leaves them. */
const DIR_MODE = 0o755;
/** Regular file permissions. */
const FILE_MODE = 0o644;
/** Permissions of PAX extended headers (ignored by readers; Go writes 0). */
const PAX_MODE = 0;

const encoder = new TextEncoder();

/** One tar entry: a directory or a regular file. */
export interface TarEntry {
  /** Path without leading slash; directories without trailing slash. */
  path: string;
  /** Entry type. */
  type: "dir" | "file";
  /** Data size in bytes (0 for directories). */
  size: number;
}

/** The name as stored in the archive: directories end with `/`. */
function entryName(entry: TarEntry): string {
  return entry.type === "dir" ? `${entry.path}/` : entry.path;
}

/** One PAX record, `"<len> <key>=<value>\n"`, where `<len>` counts the whole record. */
function paxRecord(key: string, value: string): string {
  const base = encoder.encode(` ${key}=${value}\n`).length;
  let len = base + String(base).length;
  // Adding the length's own digits can add a digit (e.g. 99 -> 101).
  if (String(len).length !== String(len - base).length) len = base + String(len).length;
  return `${len} ${key}=${value}\n`;
}

/** PAX records an entry needs, in Go's sorted key order, or "" when ustar suffices. */
function paxRecords(entry: TarEntry): string {
  let records = "";
  const name = entryName(entry);
  if (encoder.encode(name).length > NAME_LENGTH) records += paxRecord("path", name);
  if (entry.size > MAX_USTAR_SIZE) records += paxRecord("size", String(entry.size));
  return records;
}

/** Rounds up to whole blocks. */
function padded(n: number): number {
  return Math.ceil(n / BLOCK_SIZE) * BLOCK_SIZE;
}

/** Writes `text` into `field` bytes at `offset`, truncating it to fit. */
function putString(block: Uint8Array, offset: number, field: number, text: string): void {
  block.set(encoder.encode(text).subarray(0, field), offset);
}

/** Writes a zero-padded octal number ending in NUL; 0 when it does not fit (PAX carries it). */
function putOctal(block: Uint8Array, offset: number, field: number, value: number): void {
  let digits = value.toString(8);
  if (digits.length > field - 1) digits = "0";
  putString(block, offset, field, digits.padStart(field - 1, "0") + "\0");
}

/** Builds one 512-byte ustar header block. */
function ustarBlock(name: string, typeflag: string, mode: number, size: number): Uint8Array {
  const b = new Uint8Array(BLOCK_SIZE);
  putString(b, 0, NAME_LENGTH, name);
  putOctal(b, 100, 8, mode);
  putOctal(b, 108, 8, 0); // uid
  putOctal(b, 116, 8, 0); // gid
  putOctal(b, 124, 12, size);
  putOctal(b, 136, 12, 0); // mtime
  b.fill(0x20, 148, 156); // checksum is computed with its field as spaces
  putString(b, 156, 1, typeflag);
  putString(b, 257, 8, "ustar\x0000");
  putOctal(b, 329, 8, 0); // devmajor
  putOctal(b, 337, 8, 0); // devminor
  let sum = 0;
  for (let i = 0; i < BLOCK_SIZE; i++) sum += b[i];
  putString(b, 148, 8, sum.toString(8).padStart(6, "0") + "\0 ");
  return b;
}

/** Name of the PAX header entry, as Go writes it: `<dir>/PaxHeaders.0/<base>`. */
function paxName(name: string): string {
  const trimmed = name.endsWith("/") ? name.slice(0, -1) : name;
  const slash = trimmed.lastIndexOf("/");
  const dir = slash < 0 ? "" : trimmed.slice(0, slash + 1);
  return `${dir}PaxHeaders.0/${trimmed.slice(slash + 1)}`;
}

/** Bytes taken by the header(s) of `entry`: 512, plus the PAX header and records if needed. */
export function headerSize(entry: TarEntry): number {
  const records = paxRecords(entry);
  return records === "" ? BLOCK_SIZE : 2 * BLOCK_SIZE + padded(encoder.encode(records).length);
}

/**
 * The header bytes of one entry: a PAX extended header (with its padded
 * records) when the path or size does not fit ustar, then the ustar header.
 */
export function tarHeader(entry: TarEntry): Uint8Array {
  const name = entryName(entry);
  const typeflag = entry.type === "dir" ? "5" : "0";
  const mode = entry.type === "dir" ? DIR_MODE : FILE_MODE;
  const main = ustarBlock(name, typeflag, mode, entry.size);
  const records = paxRecords(entry);
  if (records === "") return main;
  const data = encoder.encode(records);
  const out = new Uint8Array(headerSize(entry));
  out.set(ustarBlock(paxName(name), "x", PAX_MODE, data.length), 0);
  out.set(data, BLOCK_SIZE);
  out.set(main, out.length - BLOCK_SIZE);
  return out;
}

/** The plan's entries in archive order: directories and files merged by path bytes. */
export function tarEntries(plan: LayerPlan): TarEntry[] {
  const entries: TarEntry[] = [
    ...plan.dirs.map((path): TarEntry => ({ path, type: "dir", size: 0 })),
    ...plan.files.map((f): TarEntry => ({ path: f.path, type: "file", size: f.size })),
  ];
  // A parent's path is a prefix of its children's, so byte order puts it first.
  return entries.sort((a, b) => compareBytes(a.path, b.path));
}

/** The exact size of the tar of `plan`, computed without generating it. */
export function tarSize(plan: LayerPlan): number {
  let total = END_OF_ARCHIVE;
  for (const entry of tarEntries(plan)) total += headerSize(entry) + padded(entry.size);
  return total;
}

/** Options for {@linkcode tarSegments}. */
export interface TarOptions {
  /** The run's seed. */
  seed: number;
  /**
   * Percentage (0–100) of file bytes that are random.
   * @default {100}
   */
  entropy?: number;
  /**
   * Makes the buffers of file data (see `ContentOptions.alloc` in content.ts).
   * @default {(n) => new Uint8Array(n)}
   */
  alloc?: (length: number) => Uint8Array;
}

/**
 * Yields the tar of `plan` as segments. Headers, padding and the end blocks
 * are `random: false`; file data keeps the flag from {@linkcode fileSegments}.
 * Every segment has its own buffer, which the consumer owns.
 */
export function* tarSegments(plan: LayerPlan, options: TarOptions): Generator<Segment> {
  const entropy = options.entropy ?? 100;
  const keys = new Map(plan.files.map((f) => [f.path, f.key]));
  for (const entry of tarEntries(plan)) {
    yield { bytes: tarHeader(entry), random: false };
    if (entry.type === "dir") continue;
    const key = keys.get(entry.path)!;
    yield* fileSegments(entry.size, { seed: options.seed, key, entropy, alloc: options.alloc });
    const pad = padded(entry.size) - entry.size;
    if (pad > 0) yield { bytes: new Uint8Array(pad), random: false };
  }
  yield { bytes: new Uint8Array(END_OF_ARCHIVE), random: false };
}

/** Tars smaller than this are generated inline: starting a Worker (tens of ms) would cost more than it saves (measured: 50 layers of 10 MB). */
export const TAR_WORKER_MIN_BYTES = 64 * 1024 * 1024;
/** The Worker posts segments in batches of at least this many bytes (or the tar's end). */
export const TAR_BATCH_BYTES = 1024 * 1024;
/** Batches the Worker may run ahead of the consumer: memory stays at about this many × 1 MiB. */
const TAR_BATCHES_AHEAD = 4;
/**
 * Most bytes of released buffers on their way back to the Worker, and kept
 * there for refilling: a few batches' worth.
 */
export const TAR_SPARE_BYTES = 4 * 1024 * 1024;
/** Released buffers smaller than this are not worth sending back. */
const MIN_REUSED_BYTES = 16 * 1024;

/** Options for {@linkcode tarSegmentStream}. */
export interface TarStreamOptions extends TarOptions {
  /**
   * Also compute the tar's SHA-256 (on the generating thread), as
   * {@linkcode TarStream.digest}.
   * @default {false}
   */
  hash?: boolean;
  /**
   * Generate on a Worker when the tar has at least this many bytes.
   * @default {TAR_WORKER_MIN_BYTES}
   */
  workerMinBytes?: number;
}

/** A message from the tar Worker. */
export interface TarWorkerReply {
  /** The next segments, in order. */
  batch?: Segment[];
  /** On the last batch: `sha256:` of the whole tar when asked for, else "". */
  done?: string;
  /** Why generation failed. */
  error?: string;
}

/** The tar of a plan as segments, and once they have all been read, its digest. */
export interface TarStream extends AsyncIterable<Segment> {
  /**
   * Hands a segment's buffer back once nothing uses it any more, so the
   * generator refills it instead of allocating (and the garbage collector
   * never sees it). Optional: a buffer not handed back is simply dropped.
   */
  release(bytes: Uint8Array): void;
  /**
   * `sha256:` of every byte yielded, with `hash: true`.
   * @throws {TypeError} before the last segment was read, or without `hash: true`.
   */
  digest(): string;
}

/**
 * The same segments as {@linkcode tarSegments}, generated (and hashed, with
 * `hash: true`) on a Worker for big layers, so the calling thread is left to
 * compress and write while the next bytes are made. The Worker runs at most
 * a few MiB ahead; stopping the iteration early stops it.
 */
export function tarSegmentStream(plan: LayerPlan, options: TarStreamOptions): TarStream {
  let digest: string | undefined;
  const inline = tarSize(plan) < (options.workerMinBytes ?? TAR_WORKER_MIN_BYTES);
  const released: ArrayBuffer[] = [];
  let releasedBytes = 0;
  // Only buffers of a length the Worker makes again are worth sending back.
  const reusable = new Set(
    repeatedSegmentLengths(options.entropy ?? 100).filter((n) => n >= MIN_REUSED_BYTES),
  );
  async function* segments(): AsyncGenerator<Segment> {
    if (inline) {
      const hash = options.hash ? createHash("sha256") : undefined;
      for (const seg of tarSegments(plan, options)) {
        hash?.update(seg.bytes);
        yield seg;
      }
      digest = hash ? `sha256:${hash.digest("hex")}` : "";
      return;
    }
    const takeReleased = () => {
      releasedBytes = 0;
      return released.splice(0);
    };
    yield* workerSegments(plan, options, takeReleased, (d) => digest = d);
  }
  return {
    [Symbol.asyncIterator]: segments,
    release(bytes) {
      // A whole buffer of a length the Worker makes again and again (1 MiB chunks, the random and
      // pattern runs of --entropy) is refilled; it goes back with the Worker's next request.
      const size = bytes.byteLength;
      if (
        !inline && bytes.byteOffset === 0 && bytes.buffer.byteLength === size &&
        reusable.has(size) && releasedBytes + size <= TAR_SPARE_BYTES
      ) {
        released.push(bytes.buffer as ArrayBuffer);
        releasedBytes += size;
      }
    },
    digest() {
      if (!options.hash) throw new TypeError("tarSegmentStream: digest() needs hash: true");
      if (digest === undefined) {
        throw new TypeError("tarSegmentStream: the tar was not read to its end");
      }
      return digest;
    },
  };
}

let liveWorkers = 0;

/** How many tar Workers are running now: none once every stream has ended (a leak check). */
export function runningTarWorkers(): number {
  return liveWorkers;
}

async function* workerSegments(
  plan: LayerPlan,
  options: TarStreamOptions,
  takeReleased: () => ArrayBuffer[],
  onDigest: (digest: string) => void,
): AsyncGenerator<Segment> {
  const worker = new Worker(new URL("./tar_worker.ts", import.meta.url), { type: "module" });
  liveWorkers++;
  const replies: TarWorkerReply[] = [];
  let wake: (() => void) | undefined;
  const arrive = (reply: TarWorkerReply) => {
    replies.push(reply);
    wake?.();
  };
  worker.onmessage = (e: MessageEvent<TarWorkerReply>) => arrive(e.data);
  worker.onerror = (e: ErrorEvent) => {
    e.preventDefault();
    arrive({ error: e.message });
  };
  try {
    worker.postMessage({
      plan,
      seed: options.seed,
      entropy: options.entropy ?? 100,
      hash: options.hash ?? false,
      ahead: TAR_BATCHES_AHEAD,
    });
    while (true) {
      if (replies.length === 0) await new Promise<void>((r) => wake = r);
      wake = undefined;
      const reply = replies.shift()!;
      if (reply.error !== undefined) throw new Error(`tar generator failed: ${reply.error}`);
      if (reply.done === undefined) {
        // One taken, one more may be made, into the buffers handed back meanwhile.
        for (const buffer of takeReleased()) worker.postMessage(buffer, [buffer]);
        worker.postMessage("more");
      }
      yield* reply.batch!;
      if (reply.done !== undefined) {
        onDigest(reply.done);
        return;
      }
    }
  } finally {
    worker.terminate();
    liveWorkers--;
  }
}
