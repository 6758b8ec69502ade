/**
 * Synthetic test images, made independently of imgmkr's own tar and
 * compression code: random files, tar'd by GNU tar, gzip'd by gzip, with a
 * config and manifest built by `jsonBlob`. Used to feed image sinks and
 * check what real consumers read back.
 *
 * @module
 */

import { createHash } from "node:crypto";
import {
  type Blob,
  type BuiltImage,
  type ImageRecord,
  type ImageSink,
  jsonBlob,
  type LayerResult,
  MediaType,
  type Platform,
} from "../../lib/oci.ts";
import { run } from "./docker.ts";

/** getRandomValues fills at most this many bytes per call. */
const RANDOM_CHUNK = 65536;
/** Chunk size when streaming a blob file into a sink. */
const STREAM_CHUNK = 64 * 1024;

/** A file inside a test layer, and what a reader should find. */
export interface TestFile {
  /** Path inside the layer, without leading slash. */
  path: string;
  /** Size in bytes. */
  size: number;
  /** Hex SHA-256 of the content. */
  sha256: string;
}

/** A test layer: its result, where its blob is, and its files. */
export interface TestLayer extends LayerResult {
  /** The blob file (gzip'd or plain tar). */
  blobPath: string;
  /** The files in it. */
  files: TestFile[];
}

/** A test image: a {@linkcode BuiltImage} whose layers are {@linkcode TestLayer}s. */
export interface TestImage extends BuiltImage {
  /** The layers, with their blob files. */
  layers: TestLayer[];
}

/** Options for {@linkcode makeImage}. */
export interface MakeImageOptions {
  /** Work directory for the files, tars and blobs. */
  dir: string;
  /** File sizes, one list per layer. */
  layers: number[][];
  /**
   * Platform of the image.
   * @default {{ os: "linux", architecture: "amd64" }}
   */
  platform?: Platform;
  /**
   * `gzip` (gzip -n) or `none` (the plain tar).
   * @default {"gzip"}
   */
  compression?: "gzip" | "none";
}

/** Hex SHA-256 of a file. */
export async function sha256File(path: string): Promise<string> {
  const hash = createHash("sha256");
  using file = await Deno.open(path);
  for await (const chunk of file.readable) hash.update(chunk);
  return hash.digest("hex");
}

/** Runs a command and returns its stdout, or throws with its stderr. */
export async function mustRun(cmd: string[], options: { cwd?: string } = {}): Promise<string> {
  const out = await run(cmd, options);
  if (out.code !== 0) throw new Error(`${cmd.join(" ")} failed (${out.code}): ${out.stderr}`);
  return out.stdout;
}

function randomBytes(size: number): Uint8Array {
  const bytes = new Uint8Array(size);
  for (let i = 0; i < size; i += RANDOM_CHUNK) {
    crypto.getRandomValues(bytes.subarray(i, Math.min(size, i + RANDOM_CHUNK)));
  }
  return bytes;
}

let layerCount = 0;

/** Makes one layer of random files with GNU tar (and gzip). */
export async function makeLayer(
  dir: string,
  sizes: number[],
  compression: "gzip" | "none" = "gzip",
): Promise<TestLayer> {
  const id = layerCount++;
  const root = `${dir}/root-${id}`;
  await Deno.mkdir(`${root}/data/sub`, { recursive: true });
  const files: TestFile[] = [];
  for (const [i, size] of sizes.entries()) {
    const path = i % 2 === 0 ? `data/f${id}-${i}.bin` : `data/sub/f${id}-${i}.bin`;
    const bytes = randomBytes(size);
    await Deno.writeFile(`${root}/${path}`, bytes);
    files.push({ path, size, sha256: createHash("sha256").update(bytes).digest("hex") });
  }
  const tarPath = `${dir}/layer-${id}.tar`;
  await mustRun([
    "tar",
    "--sort=name",
    "--owner=0",
    "--group=0",
    "--numeric-owner",
    "--mtime=@0",
    "-C",
    root,
    "-cf",
    tarPath,
    "data",
  ]);
  const diffId = `sha256:${await sha256File(tarPath)}`;
  const tarSize = (await Deno.stat(tarPath)).size;
  let blobPath = tarPath;
  if (compression === "gzip") {
    await mustRun(["gzip", "-n", "-k", "-1", tarPath]);
    blobPath = `${tarPath}.gz`;
  }
  const digest = compression === "gzip" ? `sha256:${await sha256File(blobPath)}` : diffId;
  return {
    descriptor: {
      mediaType: compression === "gzip" ? MediaType.LayerGzip : MediaType.Layer,
      digest,
      size: (await Deno.stat(blobPath)).size,
    },
    diffId,
    tarSize,
    fileBytes: sizes.reduce((a, b) => a + b, 0),
    fileCount: sizes.length,
    blobPath,
    files,
  };
}

/** Makes a single-platform image of random layers, with its config and manifest. */
export async function makeImage(options: MakeImageOptions): Promise<TestImage> {
  const platform = options.platform ?? { os: "linux", architecture: "amd64" };
  const layers: TestLayer[] = [];
  for (const sizes of options.layers) {
    layers.push(await makeLayer(options.dir, sizes, options.compression ?? "gzip"));
  }
  return imageOf(platform, layers);
}

/** The config and manifest for `layers`, as one image. */
export function imageOf(platform: Platform, layers: TestLayer[]): TestImage {
  const config = jsonBlob(MediaType.Config, {
    created: "1970-01-01T00:00:00Z",
    ...platform,
    config: {},
    rootfs: { type: "layers", diff_ids: layers.map((l) => l.diffId) },
    history: layers.map((l) => ({
      created: "1970-01-01T00:00:00Z",
      created_by: `test layer of ${l.fileCount} files`,
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

/** The record for `images` under `name:tag`: a manifest root, or an index for several. */
export function makeRecord(images: TestImage[], name: string, tag: string): ImageRecord {
  const root: Blob = images.length === 1 ? images[0].manifest : jsonBlob(MediaType.Index, {
    schemaVersion: 2,
    mediaType: MediaType.Index,
    manifests: images.map((i) => ({ ...i.manifest.descriptor, platform: i.platform })),
  });
  return { tag, name, root, images };
}

/** Options for {@linkcode writeImage}. */
export interface WriteImageOptions {
  /**
   * Stream all layers at the same time (interleaved), as concurrent builds do.
   * @default {false}
   */
  concurrent?: boolean;
  /**
   * Pass each layer's size to `createBlob()` (needed by the load sink).
   * @default {false}
   */
  sizeKnown?: boolean;
}

/** Streams one layer's blob file into `sink`. */
export async function writeLayer(
  sink: ImageSink,
  layer: TestLayer,
  options: WriteImageOptions = {},
): Promise<void> {
  const writer = await sink.createBlob({
    mediaType: layer.descriptor.mediaType,
    size: options.sizeKnown ? layer.descriptor.size : undefined,
  });
  try {
    using file = await Deno.open(layer.blobPath);
    const buf = new Uint8Array(STREAM_CHUNK);
    for (;;) {
      const n = await file.read(buf);
      if (n === null) break;
      await writer.write(buf.slice(0, n));
    }
    await writer.commit(layer.descriptor);
  } catch (err) {
    await writer.abort();
    throw err;
  }
}

/**
 * Writes a whole record the way the native builder does: layers (each
 * digest once), then configs and manifests, the root, and `commit`. On a
 * failure the sink is aborted and the error rethrown.
 */
export async function writeImage(
  sink: ImageSink,
  record: ImageRecord,
  options: WriteImageOptions = {},
): Promise<void> {
  try {
    const layers = new Map<string, TestLayer>();
    for (const image of record.images as TestImage[]) {
      for (const layer of image.layers) layers.set(layer.descriptor.digest, layer);
    }
    const todo: TestLayer[] = [];
    for (const layer of layers.values()) {
      if (!(await sink.has(layer.descriptor))) todo.push(layer);
    }
    if (options.concurrent) {
      await Promise.all(todo.map((l) => writeLayer(sink, l, options)));
    } else {
      for (const layer of todo) await writeLayer(sink, layer, options);
    }
    for (const image of record.images) {
      await sink.putBlob(image.config);
      await sink.putBlob(image.manifest);
    }
    await sink.putBlob(record.root);
    await sink.commit(record);
  } catch (err) {
    await sink.abort();
    throw err;
  }
}

/** How long a started containerd gets to answer. */
const CONTAINERD_START_TIMEOUT_MS = 30_000;

/** A private containerd started for a test. */
export interface TestContainerd {
  /** Its gRPC socket, for `ctr --address`. */
  address: string;
  /** Stops it (SIGTERM) and waits until it exits. */
  stop(): Promise<void>;
}

/**
 * Starts a containerd whose root, state and socket live under `dir`, with
 * the CRI plugin disabled, and waits until `ctr version` reaches it.
 *
 * @throws {Error} when containerd is missing or does not answer in time.
 */
export async function startContainerd(dir: string): Promise<TestContainerd> {
  const address = `${dir}/containerd.sock`;
  const config = [
    "version = 2",
    `root = "${dir}/root"`,
    `state = "${dir}/state"`,
    'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
    "[grpc]",
    `  address = "${address}"`,
    "",
  ].join("\n");
  await Deno.writeTextFile(`${dir}/config.toml`, config);
  const child = new Deno.Command("containerd", {
    args: ["--config", `${dir}/config.toml`],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  const stop = async () => {
    try {
      child.kill("SIGTERM");
    } catch {
      // already gone
    }
    await child.status;
  };
  const deadline = Date.now() + CONTAINERD_START_TIMEOUT_MS;
  while (Date.now() < deadline) {
    if ((await run(["ctr", "--address", address, "version"])).code === 0) return { address, stop };
    await new Promise((r) => setTimeout(r, 200));
  }
  await stop();
  throw new Error(
    `containerd did not answer on ${address} within ${CONTAINERD_START_TIMEOUT_MS} ms`,
  );
}

/** Every regular file under `root`, by path relative to it, with size and hex SHA-256. */
export async function listFiles(
  root: string,
): Promise<Map<string, { size: number; sha256: string }>> {
  const out = new Map<string, { size: number; sha256: string }>();
  const walk = async (dir: string, prefix: string) => {
    for await (const entry of Deno.readDir(dir)) {
      const path = `${dir}/${entry.name}`;
      const rel = prefix ? `${prefix}/${entry.name}` : entry.name;
      if (entry.isDirectory) await walk(path, rel);
      else if (entry.isFile) {
        out.set(rel, { size: (await Deno.stat(path)).size, sha256: await sha256File(path) });
      }
    }
  };
  await walk(root, "");
  return out;
}

/**
 * Runs `fn` with a fresh tmpfs of `bytes` mounted on a temp directory (to
 * test a full disk), then unmounts it. Needs root (or CAP_SYS_ADMIN).
 */
export async function withTmpfs(bytes: number, fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "imgmkr-tmpfs-" });
  try {
    await mustRun(["mount", "-t", "tmpfs", "-o", `size=${bytes}`, "tmpfs", dir]);
    try {
      await fn(dir);
    } finally {
      await mustRun(["umount", dir]);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}
