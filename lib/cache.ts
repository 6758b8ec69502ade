/**
 * A small on-disk cache of layer descriptors. A layer's bytes follow from its
 * plan, seed, entropy and compression, so once a layer has been built its
 * digest, size and diffID can be remembered. A push whose main pass would
 * only hash (to know what to HEAD) then skips that pass for cached layers and
 * uploads each missing layer in one pass. The upload still hashes the blob,
 * and a digest that differs from the cached one is a hard error.
 *
 * Entries are one JSON file each, named by the SHA-256 of everything that
 * decides the layer's bytes plus a salt (imgmkr's and Deno's versions, since
 * compressed bytes depend on the zlib/zstd inside Deno). The cache is best
 * effort: an unreadable or unwritable entry is a miss, never a failure.
 *
 * @module
 */

import { createHash } from "node:crypto";
import type { Compression, LayerResult } from "./oci.ts";
import type { LayerPlan } from "./plan.ts";

/** Bumped when an entry's format or meaning changes, so old entries are never read. */
const CACHE_FORMAT = "imgmkr-layer-cache-v1";
/** Prefix of temp files, renamed into place so a reader never sees half an entry. */
const TEMP_PREFIX = ".tmp-";

/** What decides a layer's bytes. */
export interface LayerKeyInput {
  /** The layer's plan (paths, sizes, content keys). */
  plan: LayerPlan;
  /** The run's seed. */
  seed: number;
  /** Percentage of random bytes. */
  entropy: number;
  /** The blob's compression. */
  compression: Compression;
  /** The compression level, or undefined for the compressor's default. */
  level: number | undefined;
}

/** Options for {@linkcode LayerCache}. */
export interface LayerCacheOptions {
  /** Directory of the entries; created on the first write. */
  dir: string;
  /** Versions whose change may change the bytes, e.g. `imgmkr 0.1.0, deno 2.9.6`. */
  salt: string;
}

/** The default cache directory: `$XDG_CACHE_HOME/imgmkr/layers`, else `~/.cache/imgmkr/layers`. */
export function defaultCacheDir(
  env: (name: string) => string | undefined = (n) => Deno.env.get(n),
): string | undefined {
  const base = env("XDG_CACHE_HOME") || (env("HOME") ? `${env("HOME")}/.cache` : undefined);
  return base ? `${base}/imgmkr/layers` : undefined;
}

/** Remembers the descriptors of built layers across runs. */
export class LayerCache {
  readonly #dir: string;
  readonly #salt: string;

  /** Opens the cache at `options.dir` (nothing is read or created yet). */
  constructor(options: LayerCacheOptions) {
    this.#dir = options.dir;
    this.#salt = options.salt;
  }

  /** The entry name for a layer: SHA-256 of the salt and every input. */
  key(input: LayerKeyInput): string {
    const { plan } = input;
    return createHash("sha256").update(JSON.stringify([
      CACHE_FORMAT,
      this.#salt,
      input.seed,
      input.entropy,
      input.compression,
      input.level ?? null,
      plan.dirs,
      plan.files.map((f) => [f.path, f.size, f.key]),
    ])).digest("hex");
  }

  /** The cached result for a layer, or undefined. */
  async get(input: LayerKeyInput): Promise<LayerResult | undefined> {
    try {
      const entry = JSON.parse(await Deno.readTextFile(`${this.#dir}/${this.key(input)}.json`));
      return isLayerResult(entry) ? entry : undefined;
    } catch {
      return undefined;
    }
  }

  /** Stores a layer's result; failures are ignored (the cache only saves time). */
  async put(input: LayerKeyInput, result: LayerResult): Promise<void> {
    const name = `${this.#dir}/${this.key(input)}.json`;
    const temp = `${this.#dir}/${TEMP_PREFIX}${crypto.randomUUID()}`;
    try {
      await Deno.mkdir(this.#dir, { recursive: true });
      await Deno.writeTextFile(temp, JSON.stringify(result));
      await Deno.rename(temp, name);
    } catch {
      await Deno.remove(temp).catch(() => {});
    }
  }
}

function isLayerResult(value: unknown): value is LayerResult {
  const v = value as LayerResult;
  return typeof v === "object" && v !== null &&
    typeof v.descriptor?.digest === "string" && /^sha256:[0-9a-f]{64}$/.test(v.descriptor.digest) &&
    typeof v.descriptor.size === "number" && typeof v.descriptor.mediaType === "string" &&
    typeof v.diffId === "string" && /^sha256:[0-9a-f]{64}$/.test(v.diffId) &&
    typeof v.tarSize === "number" && typeof v.fileBytes === "number" &&
    typeof v.fileCount === "number";
}
