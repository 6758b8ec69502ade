/**
 * OCI image-spec types, media types, digests, JSON documents, and the sink
 * interface that every native output (layout, archive, load, registry) implements.
 *
 * @module
 */

import { createHash } from "node:crypto";

/** OCI media types used by imgmkr. */
export const MediaType = {
  /** Image manifest. */
  Manifest: "application/vnd.oci.image.manifest.v1+json",
  /** Image index (multi-platform). */
  Index: "application/vnd.oci.image.index.v1+json",
  /** Image config. */
  Config: "application/vnd.oci.image.config.v1+json",
  /** Uncompressed layer tar. */
  Layer: "application/vnd.oci.image.layer.v1.tar",
  /** gzip layer tar. */
  LayerGzip: "application/vnd.oci.image.layer.v1.tar+gzip",
  /** zstd layer tar. */
  LayerZstd: "application/vnd.oci.image.layer.v1.tar+zstd",
} as const;

/** Layer compression choices. */
export type Compression = "gzip" | "zstd" | "none";

/** The layer media type for a compression. */
export function layerMediaType(compression: Compression): string {
  return compression === "gzip"
    ? MediaType.LayerGzip
    : compression === "zstd"
    ? MediaType.LayerZstd
    : MediaType.Layer;
}

/** An OCI platform, e.g. `{ os: "linux", architecture: "arm64", variant: "v8" }`. */
export interface Platform {
  /** Operating system, e.g. `linux`. */
  os: string;
  /** CPU architecture, e.g. `amd64`. */
  architecture: string;
  /** CPU variant, e.g. `v7`. */
  variant?: string;
}

const PLATFORM_RE = /^([a-z0-9]+)\/([a-z0-9_]+)(?:\/([a-z0-9]+))?$/;

/**
 * Parses `os/arch[/variant]`.
 * @throws {SyntaxError} when the text is not of that form.
 */
export function parsePlatform(text: string): Platform {
  const m = PLATFORM_RE.exec(text.trim());
  if (!m) {
    throw new SyntaxError(
      `Cannot parse platform '${text}': expected os/arch[/variant], such as linux/amd64`,
    );
  }
  const p: Platform = { os: m[1], architecture: m[2] };
  if (m[3]) p.variant = m[3];
  return p;
}

/** Formats a platform as `os/arch[/variant]`. */
export function formatPlatform(p: Platform): string {
  return `${p.os}/${p.architecture}${p.variant ? `/${p.variant}` : ""}`;
}

/** An OCI content descriptor. */
export interface Descriptor {
  /** Media type of the referenced content. */
  mediaType: string;
  /** `sha256:<hex>` of the content. */
  digest: string;
  /** Size in bytes. */
  size: number;
  /** Platform, for manifests inside an index. */
  platform?: Platform;
  /** Annotations. */
  annotations?: Record<string, string>;
}

/** `sha256:<hex>` of some bytes. */
export function sha256Digest(bytes: Uint8Array): string {
  return `sha256:${createHash("sha256").update(bytes).digest("hex")}`;
}

/** The hex part of a `sha256:` digest. */
export function digestHex(digest: string): string {
  if (!/^sha256:[0-9a-f]{64}$/.test(digest)) throw new TypeError(`not a sha256 digest: ${digest}`);
  return digest.slice("sha256:".length);
}

/** Encodes a JSON document as UTF-8 bytes; key order is the object's, so output is deterministic. */
export function encodeJson(value: unknown): Uint8Array {
  return new TextEncoder().encode(JSON.stringify(value));
}

/** A JSON document with its bytes and descriptor. */
export interface Blob {
  /** Descriptor of `bytes`. */
  descriptor: Descriptor;
  /** The exact bytes. */
  bytes: Uint8Array;
}

/** Makes a {@linkcode Blob} of a JSON document. */
export function jsonBlob(mediaType: string, value: unknown): Blob {
  const bytes = encodeJson(value);
  return { descriptor: { mediaType, digest: sha256Digest(bytes), size: bytes.length }, bytes };
}

/** What building one layer produced. */
export interface LayerResult {
  /** Descriptor of the (compressed) blob. */
  descriptor: Descriptor;
  /** `sha256:` of the uncompressed tar. */
  diffId: string;
  /** Size of the uncompressed tar. */
  tarSize: number;
  /** Sum of the file sizes (the requested layer size). */
  fileBytes: number;
  /** Number of regular files. */
  fileCount: number;
}

/** One finished single-platform image. */
export interface BuiltImage {
  /** Its platform. */
  platform: Platform;
  /** The manifest document. */
  manifest: Blob;
  /** The config document. */
  config: Blob;
  /** The layers, in order. */
  layers: LayerResult[];
}

/** Everything a sink needs to record an image under its tag. */
export interface ImageRecord {
  /** The tag (`org.opencontainers.image.ref.name`). */
  tag: string;
  /** Repository name as the user wrote it, e.g. `test/core` (for docker's RepoTags). */
  name: string;
  /** The root document: the manifest, or the index for several platforms. */
  root: Blob;
  /** The single-platform images, in platform order. */
  images: BuiltImage[];
}

/** Streaming writer of one blob whose digest is only known at the end. */
export interface BlobWriter {
  /**
   * Appends bytes. Unless {@linkcode retainsChunks} is `false`, the writer
   * may keep `chunk` after the promise settles (e.g. an HTTP client still
   * sending it): callers must not modify or reuse it.
   */
  write(chunk: Uint8Array): Promise<void>;
  /**
   * `false` when the writer is done with a chunk once its write() settled
   * (a file write), so the caller may reuse the buffer.
   * @default {undefined (treated as true)}
   */
  readonly retainsChunks?: boolean;
  /** Finishes the blob, which must match `desc` (digest and size computed while writing). */
  commit(desc: Descriptor): Promise<void>;
  /** Drops the partial blob. Safe to call after a failure, and more than once. */
  abort(): Promise<void>;
}

/** Options for {@linkcode ImageSink.createBlob}. */
export interface CreateBlobOptions {
  /** Media type of the blob. */
  mediaType: string;
  /**
   * Exact size when known in advance (uncompressed tars), for formats that need it up front.
   * @default {undefined}
   */
  size?: number;
  /**
   * Whether the sink hashes the bytes and checks them against the digest they
   * are committed with. `false` only for a producer that hashes exactly the
   * bytes it writes and commits with that digest (as `buildLayer` does), so
   * the same bytes are not hashed twice; the size is still checked.
   * @default {true}
   */
  verify?: boolean;
}

/**
 * A destination for a native image: OCI layout, OCI archive, `docker load`
 * stream or registry. Blobs come first, then the config, manifests and
 * index through {@linkcode putBlob}, then exactly one {@linkcode commit}.
 */
export interface ImageSink {
  /** Human-readable destination, e.g. `oci:/tmp/x`. */
  readonly name: string;
  /** True when the blob is already there, so writing it can be skipped. */
  has(desc: Descriptor): Promise<boolean>;
  /** Starts streaming a blob. */
  createBlob(options: CreateBlobOptions): Promise<BlobWriter>;
  /** Writes a small in-memory blob (config, manifest, index). */
  putBlob(blob: Blob): Promise<void>;
  /** Records the image under its tag; the last step, after which the output is complete. */
  commit(record: ImageRecord): Promise<void>;
  /** Removes everything partial; safe after a failure and more than once. */
  abort(): Promise<void>;
}
