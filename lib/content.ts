/**
 * Seeded file content. Each file gets its own pseudo-random stream, keyed by
 * the seed and a stable key (layer, platform, path), so the same seed always
 * gives the same bytes, on every output path, however the bytes are chunked.
 *
 * With `entropy` below 100, each {@linkcode ENTROPY_UNIT} of a file starts
 * with `entropy`% random bytes and ends with a highly compressible pattern.
 *
 * @module
 */

import { createHash } from "node:crypto";

/** Bytes per generated chunk: large enough to amortise calls, small enough to stay bounded. */
export const DEFAULT_CHUNK_SIZE = 1024 * 1024;
/** Granularity of the random/pattern split when `entropy` < 100. */
export const ENTROPY_UNIT = 64 * 1024;
/** Random bytes at the start of each {@linkcode ENTROPY_UNIT} for an `entropy` below 100. */
export function randomBytesPerUnit(entropy: number): number {
  return Math.floor((ENTROPY_UNIT * entropy) / 100);
}

/**
 * The segment lengths {@linkcode fileSegments} makes over and over for this
 * `entropy` (whole chunks, or the random and pattern runs of each unit);
 * other lengths come at most once per file.
 */
export function repeatedSegmentLengths(entropy: number): number[] {
  if (entropy >= 100) return [DEFAULT_CHUNK_SIZE];
  const random = randomBytesPerUnit(entropy);
  return [random, ENTROPY_UNIT - random].filter((n) => n > 0);
}

/** Length of the repeating pattern used for the compressible part. */
const PATTERN_LENGTH = 256;
/** Bumped whenever the byte stream changes, so digests from old versions never collide. */
const CONTENT_VERSION = "imgmkr-content-v1";

/** A run of file bytes, tagged with whether the generator made it random. */
export interface Segment {
  /** The bytes. The consumer owns them: they are never reused. */
  bytes: Uint8Array;
  /** True when the bytes are random (not worth compressing). */
  random: boolean;
}

/**
 * xorshift128 (Marsaglia, 2003): a fast generator whose output gzip cannot
 * shrink. It is not cryptographic, and needs not be: it only has to be
 * incompressible, distinct per key and reproducible.
 */
export class Xorshift128 {
  #s0: number;
  #s1: number;
  #s2: number;
  #s3: number;
  /** Leftover bytes of the last word, so chunking never changes the stream. */
  #carry = new Uint8Array(4);
  #carryLen = 0;

  /** Seeds the state from SHA-256 of the seed and key. */
  constructor(seed: number, key: string) {
    const h = createHash("sha256").update(`${CONTENT_VERSION}\0${seed}\0${key}`).digest();
    const v = new DataView(h.buffer, h.byteOffset, h.byteLength);
    this.#s0 = v.getUint32(0, true);
    this.#s1 = v.getUint32(4, true);
    this.#s2 = v.getUint32(8, true);
    this.#s3 = v.getUint32(12, true) | 1; // never the all-zero state
  }

  /** Fills `out` with the next `out.length` bytes of the stream. */
  fill(out: Uint8Array): void {
    let pos = 0;
    while (this.#carryLen > 0 && pos < out.length) {
      out[pos++] = this.#carry[4 - this.#carryLen--];
    }
    const remaining = out.length - pos;
    const words = remaining >>> 2;
    if (words > 0) {
      const start = out.byteOffset + pos;
      let w: Uint32Array;
      let copy = false;
      if (start % 4 === 0) {
        w = new Uint32Array(out.buffer, start, words);
      } else {
        w = new Uint32Array(words);
        copy = true;
      }
      let s0 = this.#s0, s1 = this.#s1, s2 = this.#s2, s3 = this.#s3;
      for (let i = 0; i < words; i++) {
        const t = s0 ^ (s0 << 11);
        s0 = s1;
        s1 = s2;
        s2 = s3;
        s3 = (s3 ^ (s3 >>> 19)) ^ (t ^ (t >>> 8));
        w[i] = s3;
      }
      this.#s0 = s0;
      this.#s1 = s1;
      this.#s2 = s2;
      this.#s3 = s3;
      if (copy) out.set(new Uint8Array(w.buffer), pos);
      pos += words * 4;
    }
    if (pos < out.length) {
      const word = new Uint8Array(4);
      this.fill(word);
      const n = out.length - pos;
      out.set(word.subarray(0, n), pos);
      this.#carry.set(word);
      this.#carryLen = 4 - n;
    }
  }
}

/** Options for {@linkcode fileSegments}. */
export interface ContentOptions {
  /** The run's seed. */
  seed: number;
  /** Stable key of this file, e.g. `layer1/amd64/1.00GB-file`; distinct keys give distinct bytes. */
  key: string;
  /**
   * Percentage (0–100) of the bytes that are random; the rest is a pattern.
   * @default {100}
   */
  entropy?: number;
  /**
   * Largest segment produced.
   * @default {DEFAULT_CHUNK_SIZE}
   */
  chunkSize?: number;
  /**
   * Makes each segment's buffer, which is then overwritten completely (e.g.
   * from a pool of recycled buffers).
   * @default {(n) => new Uint8Array(n)}
   */
  alloc?: (length: number) => Uint8Array;
}

function patternFor(seed: number, key: string): Uint8Array {
  // Printable text from a small alphabet, seeded so patterns differ per file.
  const alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 _-./=\n";
  const rng = new Xorshift128(seed, `pattern\0${key}`);
  const raw = new Uint8Array(PATTERN_LENGTH);
  rng.fill(raw);
  for (let i = 0; i < raw.length; i++) raw[i] = alphabet.charCodeAt(raw[i] % alphabet.length);
  return raw;
}

/**
 * Yields the bytes of one file of `size` bytes as segments of at most
 * `chunkSize` bytes. Random and pattern bytes never share a segment.
 */
export function* fileSegments(size: number, options: ContentOptions): Generator<Segment> {
  const entropy = options.entropy ?? 100;
  const chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
  const alloc = options.alloc ?? ((n: number) => new Uint8Array(n));
  if (!(entropy >= 0 && entropy <= 100)) {
    throw new RangeError(`entropy must be 0-100, got ${entropy}`);
  }
  const rng = new Xorshift128(options.seed, options.key);
  if (entropy === 100) {
    for (let off = 0; off < size; off += chunkSize) {
      const bytes = alloc(Math.min(chunkSize, size - off));
      rng.fill(bytes);
      yield { bytes, random: true };
    }
    return;
  }
  const pattern = patternFor(options.seed, options.key);
  const randomPerUnit = randomBytesPerUnit(entropy);
  let off = 0;
  while (off < size) {
    const inUnit = off % ENTROPY_UNIT;
    const random = inUnit < randomPerUnit;
    const runEnd = Math.min(size, off - inUnit + (random ? randomPerUnit : ENTROPY_UNIT));
    const len = Math.min(runEnd - off, chunkSize);
    const bytes = alloc(len);
    if (random) {
      rng.fill(bytes);
    } else {
      for (let i = 0; i < len;) {
        const p = (off + i) % PATTERN_LENGTH;
        const n = Math.min(PATTERN_LENGTH - p, len - i);
        bytes.set(pattern.subarray(p, p + n), i);
        i += n;
      }
    }
    yield { bytes, random };
    off += len;
  }
}
