/**
 * The `oci:<dir>` output: an OCI image layout (`oci-layout`, `index.json`,
 * `blobs/sha256/<hex>`), written so that a failure or an interrupt never
 * leaves a partial blob or a half-written `index.json`.
 *
 * Each blob streams into a hidden temp file inside `blobs/sha256/`, is
 * checked against the descriptor it is committed with (size and SHA-256,
 * hashed while writing), flushed, and renamed to its digest. `index.json` is
 * replaced the same way. Writing into an existing layout adds or replaces
 * one tag and keeps every other image.
 *
 * @module
 */

import { createHash, type Hash } from "node:crypto";
import { UsageError } from "./errors.ts";
import {
  type Blob,
  type BlobWriter,
  type CreateBlobOptions,
  type Descriptor,
  digestHex,
  encodeJson,
  type ImageRecord,
  type ImageSink,
  MediaType,
} from "./oci.ts";

/** Annotation that names an image inside a layout (the tag, as skopeo and umoci read it). */
export const REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name";
/** The only layout version defined by the image spec (1.0 and 1.1 alike). */
const LAYOUT_VERSION = "1.0.0";
/** Name of the layout marker file. */
const LAYOUT_FILE = "oci-layout";
/** Name of the layout's index. */
const INDEX_FILE = "index.json";
/** Where blobs live, relative to the layout root. */
const BLOBS_DIR = "blobs/sha256";
/** Prefix of temp files: hidden, and never a valid digest, so readers ignore them. */
export const TEMP_PREFIX = ".tmp-";

/** Options for {@linkcode createLayoutSink}. */
export interface LayoutSinkOptions {
  /** Layout directory; created (with missing parents) when it does not exist. */
  dir: string;
  /**
   * Flush each blob and `index.json` to disk (fdatasync) before renaming it
   * into place, so a crash cannot leave a named but empty file.
   * @default {true}
   */
  sync?: boolean;
}

/**
 * Opens (or creates) an OCI image layout for writing one image.
 *
 * An empty or missing directory becomes a new layout; an existing layout is
 * added to. If nothing was committed, `abort()` removes the temp files, and
 * the directory too when this sink created it.
 *
 * @throws {UsageError} when `dir` is a file, a non-empty directory that is
 *   not a layout, or a layout with an unknown version or an unreadable `index.json`.
 */
export async function createLayoutSink(options: LayoutSinkOptions): Promise<ImageSink> {
  const dir = trimSlashes(options.dir);
  const sync = options.sync ?? true;
  const name = `oci:${options.dir}`;
  const fail = (why: string): never => {
    throw new UsageError(`Cannot write ${name}: ${why}`, {
      hint: "give a new or empty directory, or an existing OCI image layout",
    });
  };
  let created: string | undefined;
  const info = await statOrUndefined(dir);
  if (info === undefined) {
    created = await topMissingDir(dir);
    await Deno.mkdir(dir, { recursive: true });
  } else if (!info.isDirectory) {
    fail(`'${dir}' exists and is not a directory`);
  }
  try {
    const initialized = await prepareLayout(dir, sync, created !== undefined, fail);
    return new LayoutSink({ name, dir, sync, created, initialized });
  } catch (err) {
    if (created !== undefined) await removeIfPresent(created, true);
    throw err;
  }
}

/**
 * Checks that `dir` is a layout, or makes it one when it is new or empty.
 * Returns true when it turned an existing empty directory into a layout.
 */
async function prepareLayout(
  dir: string,
  sync: boolean,
  isNew: boolean,
  fail: (why: string) => never,
): Promise<boolean> {
  let initialized = false;
  const layoutFile = await readTextOrUndefined(`${dir}/${LAYOUT_FILE}`);
  if (layoutFile === undefined) {
    if (!isNew && !(await isEmptyDir(dir))) {
      fail(`'${dir}' is not empty and has no ${LAYOUT_FILE} file, so it is not an OCI layout`);
    }
    initialized = !isNew;
    await writeFileAtomic(dir, LAYOUT_FILE, encodeJson({ imageLayoutVersion: LAYOUT_VERSION }), {
      sync,
    });
  } else {
    let version: unknown;
    try {
      version = JSON.parse(layoutFile)?.imageLayoutVersion;
    } catch {
      // reported below
    }
    if (version !== LAYOUT_VERSION) {
      fail(
        `${LAYOUT_FILE} has imageLayoutVersion ${JSON.stringify(version)}, not "${LAYOUT_VERSION}"`,
      );
    }
    try {
      await readIndex(dir);
    } catch (err) {
      fail((err as Error).message);
    }
  }
  await Deno.mkdir(`${dir}/${BLOBS_DIR}`, { recursive: true });
  return initialized;
}

interface LayoutSinkState {
  name: string;
  dir: string;
  sync: boolean;
  /** The top-most directory this sink created, if any. */
  created?: string;
  /** True when this sink turned an existing empty directory into a layout. */
  initialized: boolean;
}

class LayoutSink implements ImageSink {
  readonly name: string;
  #state: LayoutSinkState;
  #open = new Set<LayoutBlobWriter>();
  #committed = false;
  #aborted = false;

  constructor(state: LayoutSinkState) {
    this.name = state.name;
    this.#state = state;
  }

  #blobPath(digest: string): string {
    return `${this.#state.dir}/${BLOBS_DIR}/${digestHex(digest)}`;
  }

  #checkUsable(): void {
    if (this.#aborted) throw new TypeError(`${this.name}: the sink was aborted`);
    if (this.#committed) throw new TypeError(`${this.name}: the sink was already committed`);
  }

  async has(desc: Descriptor): Promise<boolean> {
    const info = await statOrUndefined(this.#blobPath(desc.digest));
    return info !== undefined && info.isFile && info.size === desc.size;
  }

  async createBlob(options: CreateBlobOptions): Promise<BlobWriter> {
    this.#checkUsable();
    const blobs = `${this.#state.dir}/${BLOBS_DIR}`;
    const path = `${blobs}/${TEMP_PREFIX}${crypto.randomUUID()}`;
    const file = await Deno.open(path, { write: true, createNew: true });
    const writer = new LayoutBlobWriter({
      name: this.name,
      file,
      path,
      sync: this.#state.sync,
      target: (digest) => this.#blobPath(digest),
      done: () => this.#open.delete(writer),
      check: new BlobCheck(options),
    });
    this.#open.add(writer);
    return writer;
  }

  async putBlob(blob: Blob): Promise<void> {
    if (await this.has(blob.descriptor)) return;
    const writer = await this.createBlob({ mediaType: blob.descriptor.mediaType });
    try {
      await writer.write(blob.bytes);
      await writer.commit(blob.descriptor);
    } catch (err) {
      await writer.abort();
      throw err;
    }
  }

  async commit(record: ImageRecord): Promise<void> {
    this.#checkUsable();
    if (this.#open.size > 0) {
      throw new TypeError(
        `${this.name}: commit() called while ${this.#open.size} blob(s) are open`,
      );
    }
    for (const blob of recordDocuments(record)) await this.putBlob(blob);
    for (const desc of recordLayers(record)) {
      if (!(await this.has(desc))) {
        throw new Error(
          `Cannot commit ${this.name}: layer ${desc.digest} (${desc.size} bytes) was never written`,
        );
      }
    }
    const { dir, sync } = this.#state;
    const index = await readIndex(dir);
    const entry: Descriptor = {
      ...record.root.descriptor,
      annotations: { ...record.root.descriptor.annotations, [REF_NAME_ANNOTATION]: record.tag },
    };
    index.manifests = replaceRef(index.manifests, entry, record.tag);
    await withContext(
      this.name,
      () => writeFileAtomic(dir, INDEX_FILE, encodeJson(index), { sync }),
    );
    this.#committed = true;
  }

  async abort(): Promise<void> {
    this.#aborted = true;
    await Promise.allSettled([...this.#open].map((w) => w.abort()));
    if (this.#committed) return;
    const { dir, created, initialized } = this.#state;
    if (created !== undefined) {
      await removeIfPresent(created, true);
    } else if (initialized) {
      await removeIfPresent(`${dir}/blobs`, true);
      await removeIfPresent(`${dir}/${LAYOUT_FILE}`, false);
    }
  }
}

interface LayoutBlobWriterState {
  name: string;
  file: Deno.FsFile;
  path: string;
  sync: boolean;
  target: (digest: string) => string;
  done: () => void;
  check: BlobCheck;
}

/** Streams one blob into a temp file, then verifies and renames it. */
class LayoutBlobWriter implements BlobWriter {
  /** File writes are complete when they settle. */
  readonly retainsChunks = false;
  #s: LayoutBlobWriterState;
  #check: BlobCheck;
  #closed = false;

  constructor(state: LayoutBlobWriterState) {
    this.#s = state;
    this.#check = state.check;
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (this.#closed) throw new TypeError(`${this.#s.name}: write() after commit() or abort()`);
    this.#check.update(chunk);
    await withContext(this.#s.name, () => writeAll(this.#s.file, chunk));
  }

  async commit(desc: Descriptor): Promise<void> {
    if (this.#closed) throw new TypeError(`${this.#s.name}: commit() after commit() or abort()`);
    try {
      this.#check.verify(desc, this.#s.name);
      await withContext(this.#s.name, async () => {
        if (this.#s.sync) await this.#s.file.syncData();
        this.#s.file.close();
        this.#closed = true;
        const target = this.#s.target(desc.digest);
        const existing = await statOrUndefined(target);
        if (existing?.isFile && existing.size === desc.size) {
          // Same digest, same size: the blob is already there; keep it.
          await Deno.remove(this.#s.path);
        } else {
          await Deno.rename(this.#s.path, target);
        }
      });
      this.#s.done();
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  async abort(): Promise<void> {
    if (!this.#closed) {
      this.#closed = true;
      try {
        this.#s.file.close();
      } catch {
        // already closed
      }
    }
    await removeIfPresent(this.#s.path, false);
    this.#s.done();
  }
}

/**
 * Counts and (unless told the producer does it) hashes a blob as it is
 * written, and checks it against the descriptor it is committed with.
 */
export class BlobCheck {
  #hash: Hash | undefined;
  /** Bytes seen so far. */
  size = 0;

  /** `verify: false` checks only the size (see {@linkcode CreateBlobOptions.verify}). */
  constructor(options: Pick<CreateBlobOptions, "verify"> = {}) {
    this.#hash = options.verify === false ? undefined : createHash("sha256");
  }

  /** Adds bytes. */
  update(chunk: Uint8Array): void {
    this.#hash?.update(chunk);
    this.size += chunk.length;
  }

  /**
   * Throws unless the bytes seen have `desc`'s size and digest. Call once.
   * @throws {TypeError} naming what was written and what `desc` claims.
   */
  verify(desc: Descriptor, where: string): void {
    const digest = this.#hash ? `sha256:${this.#hash.digest("hex")}` : desc.digest;
    if (digest !== desc.digest || this.size !== desc.size) {
      throw new TypeError(
        `${where}: blob committed as ${desc.digest} (${desc.size} bytes) but ${
          this.#hash ? digest : "a blob"
        } (${this.size} bytes) was written`,
      );
    }
  }
}

/** The small documents of a record: root, then each image's manifest and config. */
export function recordDocuments(record: ImageRecord): Blob[] {
  const docs = [record.root];
  for (const image of record.images) {
    if (image.manifest.descriptor.digest !== record.root.descriptor.digest) {
      docs.push(image.manifest);
    }
    docs.push(image.config);
  }
  return docs;
}

/** Every layer descriptor of a record, each digest once. */
export function recordLayers(record: ImageRecord): Descriptor[] {
  const seen = new Map<string, Descriptor>();
  for (const image of record.images) {
    for (const layer of image.layers) seen.set(layer.descriptor.digest, layer.descriptor);
  }
  return [...seen.values()];
}

/** An image index as read from, and written to, `index.json`. */
interface IndexDocument {
  schemaVersion: number;
  mediaType?: string;
  manifests: Descriptor[];
  [key: string]: unknown;
}

/** Reads `index.json`, or an empty index when there is none. */
async function readIndex(dir: string): Promise<IndexDocument> {
  const text = await readTextOrUndefined(`${dir}/${INDEX_FILE}`);
  if (text === undefined) return { schemaVersion: 2, mediaType: MediaType.Index, manifests: [] };
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    throw new SyntaxError(`${INDEX_FILE} is not valid JSON (${(err as Error).message})`);
  }
  const index = doc as IndexDocument;
  if (typeof doc !== "object" || doc === null || !Array.isArray(index.manifests)) {
    throw new SyntaxError(`${INDEX_FILE} has no "manifests" array`);
  }
  return { ...index, schemaVersion: 2, mediaType: MediaType.Index };
}

/** `manifests` with the entry tagged `tag` replaced in place by `entry` (or `entry` appended). */
function replaceRef(manifests: Descriptor[], entry: Descriptor, tag: string): Descriptor[] {
  const out: Descriptor[] = [];
  let placed = false;
  for (const m of manifests) {
    if (m.annotations?.[REF_NAME_ANNOTATION] !== tag) {
      out.push(m);
    } else if (!placed) {
      out.push(entry);
      placed = true;
    }
  }
  if (!placed) out.push(entry);
  return out;
}

/** Options for {@linkcode writeFileAtomic}. */
export interface WriteFileAtomicOptions {
  /**
   * Flush the file, and then the directory, to disk.
   * @default {true}
   */
  sync?: boolean;
}

/**
 * Writes `dir/name` through a temp file in `dir` and a rename, so readers see
 * the old file or the new one, never a part.
 */
export async function writeFileAtomic(
  dir: string,
  name: string,
  bytes: Uint8Array,
  options: WriteFileAtomicOptions = {},
): Promise<void> {
  const sync = options.sync ?? true;
  const temp = `${dir}/${TEMP_PREFIX}${name}-${crypto.randomUUID()}`;
  try {
    const file = await Deno.open(temp, { write: true, createNew: true });
    try {
      await writeAll(file, bytes);
      if (sync) await file.syncData();
    } finally {
      file.close();
    }
    await Deno.rename(temp, `${dir}/${name}`);
  } catch (err) {
    await removeIfPresent(temp, false);
    throw err;
  }
  if (sync) await syncDir(dir);
}

/**
 * Runs a file-system operation, adding where it wrote to the message of a
 * failure ("Cannot write oci:/x: No space left on device (os error 28)").
 */
export async function withContext<T>(where: string, op: () => Promise<T>): Promise<T> {
  try {
    return await op();
  } catch (err) {
    // Operating-system errors carry an errno `code` (ENOSPC, EIO, …) or a Deno.errors class.
    const os = err instanceof Error &&
      (typeof (err as { code?: unknown }).code === "string" ||
        Object.values(Deno.errors).some((c) => err instanceof c));
    if (os) throw new Error(`Cannot write ${where}: ${(err as Error).message}`, { cause: err });
    throw err;
  }
}

/** Writes all of `bytes` (a single write may be partial). */
export async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let done = 0;
  while (done < bytes.length) done += await file.write(bytes.subarray(done));
}

/** Flushes a directory's entries (renames) to disk. */
export async function syncDir(dir: string): Promise<void> {
  const handle = await Deno.open(dir, { read: true });
  try {
    await handle.sync();
  } finally {
    handle.close();
  }
}

/** Removes a path, ignoring one that is already gone. */
export async function removeIfPresent(path: string, recursive: boolean): Promise<void> {
  try {
    await Deno.remove(path, { recursive });
  } catch (err) {
    if (!(err instanceof Deno.errors.NotFound)) throw err;
  }
}

/** `stat`, or undefined when nothing is there. */
export async function statOrUndefined(path: string): Promise<Deno.FileInfo | undefined> {
  try {
    return await Deno.stat(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
}

async function readTextOrUndefined(path: string): Promise<string | undefined> {
  try {
    return await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return undefined;
    throw err;
  }
}

async function isEmptyDir(dir: string): Promise<boolean> {
  for await (const _ of Deno.readDir(dir)) return false;
  return true;
}

/** The outermost ancestor of `dir` (or `dir` itself) that does not exist yet. */
async function topMissingDir(dir: string): Promise<string> {
  let top = dir;
  for (;;) {
    const slash = top.lastIndexOf("/");
    if (slash <= 0) return top;
    const parent = top.slice(0, slash);
    if (await statOrUndefined(parent)) return top;
    top = parent;
  }
}

/** Drops trailing slashes (but keeps `/`). */
function trimSlashes(path: string): string {
  const trimmed = path.replace(/\/+$/, "");
  return trimmed === "" ? (path.startsWith("/") ? "/" : ".") : trimmed;
}
