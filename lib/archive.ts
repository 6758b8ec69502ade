/**
 * Tar outputs of a native image:
 *
 * - `oci-archive:<file>` ({@linkcode createOciArchiveSink}): an OCI image
 *   layout as one tar, which also carries a docker-style `manifest.json` and
 *   `repositories`, so `docker load`, `podman load`, `ctr images import` and
 *   `skopeo`/`umoci` (through `oci-archive:`) all accept the same file.
 * - `load` ({@linkcode createLoadSink}): a docker-archive streamed into the
 *   stdin of a load command such as `docker load`, with no layer data on disk.
 *
 * A docker-archive (`manifest.json`) names one image per tag. For a
 * multi-platform record both sinks name the image for
 * {@linkcode ArchiveSinkOptions.platform} (by default the platform imgmkr
 * runs on), or the record's first image when none matches. The OCI index of
 * an `oci-archive` keeps every platform.
 *
 * @module
 */

import { type ChildResult, engineApiLoad, findOnPath, runChild } from "./engine.ts";
import { BuilderError, UsageError } from "./errors.ts";
import {
  BlobCheck,
  recordDocuments,
  recordLayers,
  REF_NAME_ANNOTATION,
  removeIfPresent,
  statOrUndefined,
  syncDir,
  TEMP_PREFIX,
  withContext,
  writeAll,
} from "./layout.ts";
import {
  type Blob,
  type BlobWriter,
  type BuiltImage,
  type CreateBlobOptions,
  type Descriptor,
  digestHex,
  encodeJson,
  type ImageRecord,
  type ImageSink,
  MediaType,
  type Platform,
  sha256Digest,
} from "./oci.ts";
import { parseReference } from "./reference.ts";
import { BLOCK_SIZE, MAX_USTAR_SIZE, tarHeader } from "./tar.ts";

/** Annotation containerd (`ctr`, nerdctl, finch) reads as the full image name on import. */
export const CONTAINERD_NAME_ANNOTATION = "io.containerd.image.name";
/** The end of a tar archive: two zero blocks. */
const END_OF_ARCHIVE = new Uint8Array(2 * BLOCK_SIZE);
/** Offset and length of the ustar `size` field. */
const SIZE_FIELD = { offset: 124, length: 12 };
/** Offset and length of the ustar `chksum` field. */
const CHECKSUM_FIELD = { offset: 148, length: 8 };
/** Marks a base-256 (binary) number in a numeric field, as GNU tar and Go write sizes ≥ 8 GiB. */
const BASE256_FLAG = 0x80;
/** Read buffer for copying a spooled blob into the archive. */
const COPY_CHUNK = 1024 * 1024;

/** Options shared by the tar sinks. */
export interface ArchiveSinkOptions {
  /**
   * The platform whose image `manifest.json` names when the record has several.
   * @default {hostPlatform()}
   */
  platform?: Platform;
}

/** The platform imgmkr runs on, as a container platform (macOS and Windows run Linux images). */
export function hostPlatform(): Platform {
  const arch = Deno.build.arch === "aarch64" ? "arm64" : "amd64";
  return { os: "linux", architecture: arch };
}

/**
 * The image of `record` for `platform`: same os and architecture (and
 * variant, when `platform` names one), else the record's first image.
 */
export function pickImage(record: ImageRecord, platform: Platform = hostPlatform()): BuiltImage {
  const match = record.images.find((image) =>
    image.platform.os === platform.os &&
    image.platform.architecture === platform.architecture &&
    (platform.variant === undefined || image.platform.variant === platform.variant)
  );
  const image = match ?? record.images[0];
  if (image === undefined) throw new TypeError(`The record for tag '${record.tag}' has no images`);
  return image;
}

/**
 * One 512-byte ustar header for a regular file. Sizes beyond the octal
 * field (8 GiB and more) are written in base-256, which Go's `archive/tar`
 * (docker, podman, containerd, skopeo) and GNU tar read, so the header
 * keeps its size when it is patched in after the data.
 *
 * @throws {RangeError} when `path` does not fit the 100-byte name field.
 */
export function fileHeader(path: string, size: number): Uint8Array {
  const block = tarHeader({ path, type: "file", size: size > MAX_USTAR_SIZE ? 0 : size });
  if (block.length !== BLOCK_SIZE) {
    throw new RangeError(`Cannot write tar entry '${path}': the name is longer than 100 bytes`);
  }
  if (size <= MAX_USTAR_SIZE) return block;
  let value = BigInt(size);
  const { offset, length } = SIZE_FIELD;
  block[offset] = BASE256_FLAG;
  for (let i = offset + length - 1; i > offset; i--) {
    block[i] = Number(value & 0xffn);
    value >>= 8n;
  }
  block.fill(0x20, CHECKSUM_FIELD.offset, CHECKSUM_FIELD.offset + CHECKSUM_FIELD.length);
  let sum = 0;
  for (const byte of block) sum += byte;
  const text = sum.toString(8).padStart(6, "0") + "\0 ";
  block.set(new TextEncoder().encode(text), CHECKSUM_FIELD.offset);
  return block;
}

/** Zero bytes that pad `size` bytes of data to a whole tar block. */
function padding(size: number): Uint8Array {
  return new Uint8Array((BLOCK_SIZE - (size % BLOCK_SIZE)) % BLOCK_SIZE);
}

/** A whole tar entry (header, data, padding) for small in-memory data. */
function fileEntry(path: string, bytes: Uint8Array): Uint8Array {
  const header = fileHeader(path, bytes.length);
  const out = new Uint8Array(header.length + bytes.length + padding(bytes.length).length);
  out.set(header, 0);
  out.set(bytes, header.length);
  return out;
}

/**
 * The docker-archive documents naming `image` under the record's fully
 * qualified name (`docker.io/t/n:1` for `t/n:1`). docker shows it as `t/n:1`
 * either way, but podman would file a bare `t/n` under `localhost/`, unlike
 * the `docker.io/t/n` it reads from the OCI index and containerd stores.
 */
function dockerDocuments(
  record: ImageRecord,
  image: BuiltImage,
  configPath: string,
  layerPaths: string[],
): { manifest: Uint8Array; repositories: Uint8Array } {
  const repo = qualifiedRepository(record);
  const manifest = [{
    Config: configPath,
    RepoTags: [`${repo}:${record.tag}`],
    Layers: layerPaths,
  }];
  // Legacy (pre-1.10) loaders read `repositories`; modern ones use manifest.json.
  const repositories = { [repo]: { [record.tag]: digestHex(image.config.descriptor.digest) } };
  return { manifest: encodeJson(manifest), repositories: encodeJson(repositories) };
}

/** `docker.io/library/x` for `x`, as containerd stores names; the name as written if unparsable. */
function qualifiedRepository(record: ImageRecord): string {
  try {
    const ref = parseReference(`${record.name}:${record.tag}`);
    return `${ref.registry}/${ref.repository}`;
  } catch {
    return record.name;
  }
}

/** A first-come-first-served async lock. */
class Mutex {
  #locked = false;
  #waiters: (() => void)[] = [];

  /** True when nobody holds or waits for the lock. */
  get idle(): boolean {
    return !this.#locked && this.#waiters.length === 0;
  }

  tryAcquire(): boolean {
    if (!this.idle) return false;
    this.#locked = true;
    return true;
  }

  acquire(): Promise<void> {
    if (this.tryAcquire()) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  release(): void {
    const next = this.#waiters.shift();
    if (next) next();
    else this.#locked = false;
  }

  /** Lets every waiter through (each must then see that the owner gave up). */
  releaseAll(): void {
    while (this.#waiters.length > 0) this.#waiters.shift()!();
    this.#locked = false;
  }
}

// ---------------------------------------------------------------------------
// oci-archive

/** Options for {@linkcode createOciArchiveSink}. */
export interface OciArchiveSinkOptions extends ArchiveSinkOptions {
  /** The tar file to write; replaced only on commit. Its directory must exist. */
  file: string;
  /**
   * Flush the tar to disk (fdatasync) before renaming it into place.
   * @default {true}
   */
  sync?: boolean;
}

/**
 * Opens an `oci-archive:` output. The tar is written to a hidden temp file
 * next to `file` and renamed to `file` on commit; `abort()` removes it.
 *
 * Layout of the tar: `oci-layout`, `blobs/sha256/<hex>` for each blob,
 * `index.json` (the root with `org.opencontainers.image.ref.name: <tag>`
 * and `io.containerd.image.name: <full name>:<tag>`), then `manifest.json`
 * and `repositories` for docker-archive readers. The first blob streamed at
 * a time goes straight into the tar and its header is patched on commit;
 * blobs that stream while another one is open are spooled to a temp file
 * beside the target and appended when the tar is free.
 *
 * @throws {UsageError} when `file` is a directory or its directory does not exist.
 */
export async function createOciArchiveSink(options: OciArchiveSinkOptions): Promise<ImageSink> {
  const name = `oci-archive:${options.file}`;
  const slash = options.file.lastIndexOf("/");
  const dir = slash < 0 ? "." : slash === 0 ? "/" : options.file.slice(0, slash);
  const base = options.file.slice(slash + 1);
  const fail = (why: string): never => {
    throw new UsageError(`Cannot write ${name}: ${why}`, {
      hint: "give a file path in an existing directory, such as /tmp/image.tar",
    });
  };
  if (base === "") fail("the path names a directory");
  const dirInfo = await statOrUndefined(dir);
  if (!dirInfo?.isDirectory) fail(`directory '${dir}' does not exist`);
  if ((await statOrUndefined(options.file))?.isDirectory) fail(`'${options.file}' is a directory`);
  const temp = `${dir}/${TEMP_PREFIX}${base}-${crypto.randomUUID()}`;
  const file = await Deno.open(temp, { write: true, createNew: true });
  const sink = new OciArchiveSink({
    name,
    target: options.file,
    dir,
    temp,
    file,
    sync: options.sync ?? true,
    platform: options.platform ?? hostPlatform(),
  });
  try {
    await sink.start();
  } catch (err) {
    await sink.abort();
    throw err;
  }
  return sink;
}

interface OciArchiveState {
  name: string;
  target: string;
  dir: string;
  temp: string;
  file: Deno.FsFile;
  sync: boolean;
  platform: Platform;
}

class OciArchiveSink implements ImageSink {
  readonly name: string;
  #s: OciArchiveState;
  /** Bytes in the temp tar so far (the file position). */
  #offset = 0;
  /** Guards the end of the tar: one writer (direct blob, append) at a time. */
  #tail = new Mutex();
  /** Blobs in the tar, or queued to be appended, by digest. */
  #blobs = new Set<string>();
  #open = new Set<BlobWriter>();
  /** Spooled blobs not yet appended: path → close-and-remove. */
  #spools = new Map<string, () => Promise<void>>();
  #tasks: Promise<void>[] = [];
  #failure: unknown = undefined;
  #committed = false;
  #aborted = false;

  constructor(state: OciArchiveState) {
    this.name = state.name;
    this.#s = state;
  }

  /** Writes the entries that open the archive. */
  async start(): Promise<void> {
    await this.#append(fileEntry("oci-layout", encodeJson({ imageLayoutVersion: "1.0.0" })));
    await this.#append(tarHeader({ path: "blobs", type: "dir", size: 0 }));
    await this.#append(tarHeader({ path: "blobs/sha256", type: "dir", size: 0 }));
  }

  #checkUsable(): void {
    if (this.#aborted) throw new TypeError(`${this.name}: the sink was aborted`);
    if (this.#committed) throw new TypeError(`${this.name}: the sink was already committed`);
    if (this.#failure !== undefined) throw this.#failure;
  }

  async #append(bytes: Uint8Array): Promise<void> {
    await withContext(this.name, () => writeAll(this.#s.file, bytes));
    this.#offset += bytes.length;
  }

  /** Drops everything after `offset` (an entry that turned out to be a duplicate or failed). */
  async #truncate(offset: number): Promise<void> {
    await this.#s.file.truncate(offset);
    await this.#s.file.seek(offset, Deno.SeekMode.Start);
    this.#offset = offset;
  }

  /** Overwrites bytes at `offset`, then returns to the end. */
  async #patch(offset: number, bytes: Uint8Array): Promise<void> {
    await this.#s.file.seek(offset, Deno.SeekMode.Start);
    await writeAll(this.#s.file, bytes);
    await this.#s.file.seek(this.#offset, Deno.SeekMode.Start);
  }

  /** Runs `op` holding the tail lock, in the background; a failure fails the sink. */
  #enqueue(op: () => Promise<void>): Promise<void> {
    const task = (async () => {
      await this.#tail.acquire();
      try {
        if (!this.#aborted) await op();
      } catch (err) {
        this.#failure ??= err;
      } finally {
        this.#tail.release();
      }
    })();
    this.#tasks.push(task);
    return task;
  }

  async #settle(): Promise<void> {
    while (this.#tasks.length > 0) await Promise.all(this.#tasks.splice(0));
    if (this.#failure !== undefined) throw this.#failure;
  }

  has(desc: Descriptor): Promise<boolean> {
    return Promise.resolve(this.#blobs.has(digestHex(desc.digest)));
  }

  async createBlob(options: CreateBlobOptions): Promise<BlobWriter> {
    this.#checkUsable();
    const check = new BlobCheck(options);
    const writer = this.#tail.tryAcquire()
      ? await this.#directWriter(check)
      : await this.#spoolWriter(check);
    this.#open.add(writer);
    return writer;
  }

  /** A writer that streams into the tar itself; it holds the tail lock until it ends. */
  async #directWriter(check: BlobCheck): Promise<BlobWriter> {
    const start = this.#offset;
    let ended = false;
    const end = () => {
      if (ended) return;
      ended = true;
      this.#open.delete(writer);
      this.#tail.release();
    };
    const writer: BlobWriter = {
      retainsChunks: false, // a file write, complete when it settles
      write: async (chunk) => {
        if (ended) throw new TypeError(`${this.name}: write() after commit() or abort()`);
        check.update(chunk);
        await this.#append(chunk);
      },
      commit: async (desc) => {
        if (ended) throw new TypeError(`${this.name}: commit() after commit() or abort()`);
        let claimed: string | undefined;
        try {
          check.verify(desc, this.name);
          const hex = digestHex(desc.digest);
          if (this.#blobs.has(hex)) {
            await this.#truncate(start);
          } else {
            // Claim the digest before any await, so a spooled twin committing meanwhile drops itself.
            this.#blobs.add(hex);
            claimed = hex;
            await this.#append(padding(desc.size));
            await this.#patch(start, fileHeader(`blobs/sha256/${hex}`, desc.size));
          }
        } catch (err) {
          if (claimed !== undefined) this.#blobs.delete(claimed);
          // Drop the entry so the tar stays whole; if even that fails, the sink is broken.
          await this.#truncate(start).catch((e) => this.#failure ??= e);
          throw err;
        } finally {
          end();
        }
      },
      abort: async () => {
        if (ended) return;
        try {
          if (!this.#aborted) await this.#truncate(start);
        } catch (err) {
          this.#failure ??= err;
        } finally {
          end();
        }
      },
    };
    try {
      await this.#append(new Uint8Array(BLOCK_SIZE)); // header placeholder, patched on commit
    } catch (err) {
      end();
      throw err;
    }
    return writer;
  }

  /** A writer that spools to a temp file, appended to the tar after commit. */
  async #spoolWriter(check: BlobCheck): Promise<BlobWriter> {
    const path = `${this.#s.temp}-${crypto.randomUUID()}.blob`;
    const file = await Deno.open(path, { read: true, write: true, createNew: true });
    let ended = false;
    const drop = async () => {
      this.#spools.delete(path);
      try {
        file.close();
      } catch {
        // already closed
      }
      await removeIfPresent(path, false);
    };
    this.#spools.set(path, drop);
    const writer: BlobWriter = {
      retainsChunks: false, // a file write, complete when it settles
      write: async (chunk) => {
        if (ended) throw new TypeError(`${this.name}: write() after commit() or abort()`);
        check.update(chunk);
        await withContext(this.name, () => writeAll(file, chunk));
      },
      commit: async (desc) => {
        if (ended) throw new TypeError(`${this.name}: commit() after commit() or abort()`);
        ended = true;
        this.#open.delete(writer);
        try {
          check.verify(desc, this.name);
        } catch (err) {
          await drop();
          throw err;
        }
        const hex = digestHex(desc.digest);
        if (this.#blobs.has(hex)) {
          await drop();
          return;
        }
        this.#blobs.add(hex);
        // Appended when the tail is free, so a commit never waits for another blob.
        this.#enqueue(async () => {
          try {
            await this.#append(fileHeader(`blobs/sha256/${hex}`, desc.size));
            await file.seek(0, Deno.SeekMode.Start);
            const buf = new Uint8Array(COPY_CHUNK);
            let copied = 0;
            for (;;) {
              const n = await file.read(buf);
              if (n === null) break;
              await this.#append(buf.subarray(0, n));
              copied += n;
            }
            if (copied !== desc.size) {
              throw new Error(
                `${this.name}: spooled blob ${desc.digest} shrank to ${copied} bytes`,
              );
            }
            await this.#append(padding(desc.size));
          } finally {
            await drop();
          }
        });
      },
      abort: async () => {
        if (!ended) {
          ended = true;
          this.#open.delete(writer);
        }
        await drop();
      },
    };
    return writer;
  }

  async putBlob(blob: Blob): Promise<void> {
    this.#checkUsable();
    const hex = digestHex(blob.descriptor.digest);
    if (this.#blobs.has(hex)) return;
    if (
      sha256Digest(blob.bytes) !== blob.descriptor.digest ||
      blob.bytes.length !== blob.descriptor.size
    ) {
      throw new TypeError(`${this.name}: putBlob() bytes do not match ${blob.descriptor.digest}`);
    }
    this.#blobs.add(hex);
    const idle = this.#tail.idle;
    const task = this.#enqueue(() => this.#append(fileEntry(`blobs/sha256/${hex}`, blob.bytes)));
    // Wait only when nothing else holds the tar, so putBlob never waits for a streaming blob.
    if (idle) await task;
    if (this.#failure !== undefined) throw this.#failure;
  }

  async commit(record: ImageRecord): Promise<void> {
    this.#checkUsable();
    if (this.#open.size > 0) {
      throw new TypeError(
        `${this.name}: commit() called while ${this.#open.size} blob(s) are open`,
      );
    }
    await this.#settle();
    for (const blob of recordDocuments(record)) await this.putBlob(blob);
    await this.#settle();
    for (const desc of recordLayers(record)) {
      if (!this.#blobs.has(digestHex(desc.digest))) {
        throw new Error(
          `Cannot commit ${this.name}: layer ${desc.digest} (${desc.size} bytes) was never written`,
        );
      }
    }
    const annotations: Record<string, string> = {
      ...record.root.descriptor.annotations,
      [REF_NAME_ANNOTATION]: record.tag,
    };
    annotations[CONTAINERD_NAME_ANNOTATION] = `${qualifiedRepository(record)}:${record.tag}`;
    const index = {
      schemaVersion: 2,
      mediaType: MediaType.Index,
      manifests: [{ ...record.root.descriptor, annotations }],
    };
    const image = pickImage(record, this.#s.platform);
    const path = (d: Descriptor) => `blobs/sha256/${digestHex(d.digest)}`;
    const docker = dockerDocuments(
      record,
      image,
      path(image.config.descriptor),
      image.layers.map((l) => path(l.descriptor)),
    );
    await this.#tail.acquire();
    try {
      await this.#append(fileEntry("index.json", encodeJson(index)));
      await this.#append(fileEntry("manifest.json", docker.manifest));
      await this.#append(fileEntry("repositories", docker.repositories));
      await this.#append(END_OF_ARCHIVE);
      await withContext(this.name, async () => {
        if (this.#s.sync) await this.#s.file.syncData();
        this.#s.file.close();
        await Deno.rename(this.#s.temp, this.#s.target);
      });
      this.#committed = true;
    } finally {
      this.#tail.release();
    }
    if (this.#s.sync) await syncDir(this.#s.dir);
  }

  async abort(): Promise<void> {
    if (this.#committed) return;
    this.#aborted = true;
    await Promise.allSettled([...this.#open].map((w) => w.abort()));
    await Promise.allSettled(this.#tasks.splice(0));
    try {
      this.#s.file.close();
    } catch {
      // already closed
    }
    await removeIfPresent(this.#s.temp, false);
    await Promise.allSettled([...this.#spools.values()].map((drop) => drop()));
  }
}

// ---------------------------------------------------------------------------
// load

/** Options for {@linkcode createLoadSink}. */
export interface LoadSinkOptions extends ArchiveSinkOptions {
  /** The command that reads a docker-archive on stdin, e.g. `["docker", "load"]`. */
  command: string[];
  /**
   * A Docker Engine API unix socket: the stream then goes to its
   * `POST /images/load` (see {@linkcode engineApiLoad}) instead of through
   * `command`, saving the CLI's copy of every byte; `command` is not run.
   * @default {undefined}
   */
  socket?: string;
}

/**
 * Starts `command` and returns a sink that streams a docker-archive into its
 * stdin: each layer as `<n>/layer.tar` as it is built (so layers must be
 * uncompressed tars of known size), then on commit the config as
 * `<hex>.json`, `manifest.json` and `repositories`. Nothing is written to
 * disk. Blobs stream one at a time: `createBlob()` waits until the previous
 * blob is committed.
 *
 * `manifest.json`, the only entry that makes the command tag an image, is
 * sent only after every layer is complete, and `abort()` kills the command,
 * so an aborted stream never leaves a tagged image.
 *
 * @throws {BuilderError} when the command is not on PATH; later calls throw
 *   it when the command exits early or fails, with the end of its output.
 */
export function createLoadSink(options: LoadSinkOptions): Promise<ImageSink> {
  const command = options.command;
  if (command.length === 0) {
    return Promise.reject(new TypeError("createLoadSink: the command is empty"));
  }
  const platform = options.platform ?? hostPlatform();
  const socket = options.socket;
  if (socket !== undefined) {
    return Promise.resolve(
      new LoadSink({
        what: `the Docker Engine API at ${socket}`,
        status: (code) => `HTTP status ${code}`,
        run: (body, signal) => engineApiLoad(socket, body, { signal }),
      }, platform),
    );
  }
  const exe = command[0];
  if (!exe.includes("/") && findOnPath(exe) === undefined) {
    return Promise.reject(
      new BuilderError(`Cannot run '${command.join(" ")}': '${exe}' is not on PATH`),
    );
  }
  return Promise.resolve(
    new LoadSink({
      what: `'${command.join(" ")}'`,
      status: (code) => `exit code ${code}`,
      run: (stdin, signal) => runChild(command, { stdin, signal }),
    }, platform),
  );
}

/** What reads the stream of a {@linkcode LoadSink}: a command's stdin or the engine API. */
interface LoadTransport {
  /** Names it in messages, e.g. `'docker load'`. */
  what: string;
  /** Describes a failure code, e.g. `exit code 1`. */
  status(code: number): string;
  /** Starts it reading `body`; settles once it has finished (or been stopped by `signal`). */
  run(body: ReadableStream<Uint8Array>, signal: AbortSignal): Promise<ChildResult>;
}

class LoadSink implements ImageSink {
  readonly name: string;
  #transport: LoadTransport;
  #platform: Platform;
  #writer: WritableStreamDefaultWriter<Uint8Array>;
  #stop = new AbortController();
  #result: Promise<{ code: number; tail: string }>;
  #turn = new Mutex();
  #layers = new Map<string, string>();
  #count = 0;
  #open: BlobWriter | undefined;
  #committed = false;
  #aborted = false;
  /** Set once the final entries are being sent: a reader may then finish before close(). */
  #closing = false;
  #failure: unknown = undefined;

  constructor(transport: LoadTransport, platform: Platform) {
    this.name = `load (${transport.what})`;
    this.#transport = transport;
    this.#platform = platform;
    const pipe = new TransformStream<Uint8Array, Uint8Array>();
    this.#writer = pipe.writable.getWriter();
    this.#result = transport.run(pipe.readable, this.#stop.signal);
    // Rejections are reported through #fail(); keep them from being unhandled meanwhile.
    this.#result.catch(() => {});
    this.#writer.closed.catch(() => {});
    // A reader that is gone (failed, unreachable, or done before the stream ended) reads no
    // more: fail pending and later writes instead of leaving them waiting forever.
    const stopWriting = (failed: boolean) => {
      if (failed || !this.#closing) {
        this.#writer.abort(new Error("the reader is gone")).catch(() => {});
      }
    };
    this.#result.then((r) => stopWriting(r.code !== 0), () => stopWriting(true));
  }

  #checkUsable(): void {
    if (this.#aborted) throw new TypeError(`${this.name}: the sink was aborted`);
    if (this.#committed) throw new TypeError(`${this.name}: the sink was already committed`);
    if (this.#failure !== undefined) throw this.#failure;
  }

  /** The error to report after the stream broke: what the command said, if it stopped. */
  async #fail(cause: unknown): Promise<never> {
    if (this.#failure === undefined) {
      let error: unknown = cause;
      if (!this.#aborted) {
        try {
          const { code, tail } = await this.#result;
          error = new BuilderError(
            `${this.#transport.what} stopped reading the image stream ` +
              `(${this.#transport.status(code)})${tail ? `:\n${tail}` : ""}`,
            { cause },
          );
        } catch (err) {
          const why = err instanceof Error ? err.message : String(err);
          error = new BuilderError(`Cannot stream into ${this.#transport.what}: ${why}`, { cause });
        }
      }
      this.#failure = error;
    }
    throw this.#failure;
  }

  async #send(bytes: Uint8Array): Promise<void> {
    if (this.#aborted) throw new TypeError(`${this.name}: the sink was aborted`);
    try {
      await this.#writer.write(bytes);
    } catch (err) {
      await this.#fail(err);
    }
  }

  has(desc: Descriptor): Promise<boolean> {
    return Promise.resolve(this.#layers.has(digestHex(desc.digest)));
  }

  async createBlob(options: CreateBlobOptions): Promise<BlobWriter> {
    this.#checkUsable();
    const size = options.size;
    if (size === undefined) {
      throw new TypeError(
        `${this.name}: createBlob() needs options.size: a docker-archive stream writes each ` +
          `tar header before its data, so load takes uncompressed layers (--compression none)`,
      );
    }
    await this.#turn.acquire();
    try {
      this.#checkUsable();
      const path = `${this.#count++}/layer.tar`;
      await this.#send(fileHeader(path, size));
      const writer = this.#layerWriter(path, size, new BlobCheck(options));
      this.#open = writer;
      return writer;
    } catch (err) {
      this.#turn.release();
      throw err;
    }
  }

  #layerWriter(path: string, size: number, check: BlobCheck): BlobWriter {
    let ended = false;
    const end = () => {
      ended = true;
      this.#open = undefined;
      this.#turn.release();
    };
    return {
      write: async (chunk) => {
        if (ended) throw new TypeError(`${this.name}: write() after commit() or abort()`);
        if (check.size + chunk.length > size) {
          throw new RangeError(
            `${this.name}: layer ${path} was announced as ${size} bytes; ` +
              `writing ${chunk.length} more after ${check.size} would exceed it`,
          );
        }
        check.update(chunk);
        await this.#send(chunk);
      },
      commit: async (desc) => {
        if (ended) throw new TypeError(`${this.name}: commit() after commit() or abort()`);
        try {
          check.verify(desc, this.name);
          if (desc.size !== size) {
            throw new TypeError(`${this.name}: layer ${path} was announced as ${size} bytes`);
          }
          await this.#send(padding(size));
          this.#layers.set(digestHex(desc.digest), path);
        } finally {
          end();
        }
      },
      abort: async () => {
        if (ended) return;
        end();
        // Part of an entry went down the pipe: the stream cannot continue.
        await this.abort();
      },
    };
  }

  putBlob(_blob: Blob): Promise<void> {
    // docker-archive carries no manifests, and the config is written on commit.
    this.#checkUsable();
    return Promise.resolve();
  }

  async commit(record: ImageRecord): Promise<void> {
    this.#checkUsable();
    if (this.#open !== undefined) {
      throw new TypeError(`${this.name}: commit() called while a blob is open`);
    }
    const image = pickImage(record, this.#platform);
    const layerPaths = image.layers.map((layer) => {
      const path = this.#layers.get(digestHex(layer.descriptor.digest));
      if (path === undefined) {
        throw new Error(
          `Cannot commit ${this.name}: layer ${layer.descriptor.digest} was never streamed`,
        );
      }
      return path;
    });
    const configPath = `${digestHex(image.config.descriptor.digest)}.json`;
    const docker = dockerDocuments(record, image, configPath, layerPaths);
    await this.#turn.acquire();
    try {
      await this.#send(fileEntry(configPath, image.config.bytes));
      await this.#send(fileEntry("manifest.json", docker.manifest));
      await this.#send(fileEntry("repositories", docker.repositories));
      await this.#send(END_OF_ARCHIVE);
      this.#closing = true;
      try {
        await this.#writer.close();
      } catch (err) {
        await this.#fail(err);
      }
      let result: { code: number; tail: string };
      try {
        result = await this.#result;
      } catch (err) {
        return await this.#fail(err);
      }
      if (result.code !== 0) {
        this.#failure = new BuilderError(
          `${this.#transport.what} failed with ${this.#transport.status(result.code)}` +
            `${result.tail ? `:\n${result.tail}` : ""}`,
        );
        throw this.#failure;
      }
      this.#committed = true;
    } finally {
      this.#turn.release();
    }
  }

  async abort(): Promise<void> {
    if (this.#committed || this.#aborted) return;
    this.#aborted = true;
    this.#stop.abort();
    await this.#writer.abort(new Error("aborted")).catch(() => {});
    await this.#result.catch(() => {});
    this.#turn.releaseAll();
  }
}
