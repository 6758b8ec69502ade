/**
 * Layer plans: which files each layer holds, at which paths and sizes.
 * Plans depend only on the sizes, the options and the seed, so every output
 * path (Dockerfile build, OCI layout, registry push) writes the same files.
 *
 * @module
 */

import { Xorshift128 } from "./content.ts";
import { formatSize } from "./sizes.ts";

/** Default deepest nesting of directories below a layer's root with `--mock-fs`. */
export const DEFAULT_MAX_DEPTH = 3;
/** Deepest nesting allowed: deeper trees test nothing new and only slow tools down. */
export const MAX_MAX_DEPTH = 32;
/** With `--mock-fs` and no `--target-files`: one file per this many bytes… */
export const BYTES_PER_DEFAULT_FILE = 10 * 1024 * 1024;
/** …but at least this many files… */
export const MIN_DEFAULT_FILES = 5;
/** …and at most this many. */
export const MAX_DEFAULT_FILES = 1000;
/** Largest mock-fs file, unless the layer is too big to split into files this small. */
export const MAX_MOCK_FILE_SIZE = 512 * 1024 * 1024;

/** One regular file of a layer. */
export interface PlannedFile {
  /** Path inside the image, without a leading slash, e.g. `layer1/1.00GB-file`. */
  path: string;
  /** Exact size in bytes (at least 1). */
  size: number;
  /** Content key handed to {@linkcode fileSegments}; distinct for every file of every layer. */
  key: string;
}

/** One layer of the plan. */
export interface LayerPlan {
  /** 1-based position in the image. */
  index: number;
  /** Requested size: the sum of all file sizes. */
  size: number;
  /** The layer's top directory, e.g. `layer1`. */
  root: string;
  /** Every directory, parents first, sorted, without trailing slash (includes `root`). */
  dirs: string[];
  /** Every file, sorted by path. */
  files: PlannedFile[];
  /** True when the layer is a mock root filesystem. */
  mockFs: boolean;
}

/** Options for {@linkcode planLayers}. */
export interface PlanOptions {
  /** Size of each layer in bytes; one layer per entry. */
  sizes: number[];
  /** The run's seed. */
  seed: number;
  /**
   * Make each layer a tree of many files instead of one file.
   * @default {false}
   */
  mockFs?: boolean;
  /**
   * Deepest directory nesting below the layer root (mock-fs only).
   * @default {DEFAULT_MAX_DEPTH}
   */
  maxDepth?: number;
  /**
   * Exact number of files per layer (mock-fs only); derived from the size when unset.
   * @default {undefined}
   */
  targetFiles?: number;
  /**
   * Extra content key, e.g. a platform, so otherwise equal plans get distinct bytes.
   * @default {""}
   */
  variant?: string;
}

/** The default number of mock-fs files for a layer of `size` bytes. */
export function defaultFileCount(size: number): number {
  const n = Math.round(size / BYTES_PER_DEFAULT_FILE);
  return Math.min(size, Math.max(MIN_DEFAULT_FILES, Math.min(MAX_DEFAULT_FILES, n)));
}

/**
 * Plans every layer.
 *
 * @throws {RangeError} when a layer is smaller than its file count, or an option is out of range.
 */
export function planLayers(options: PlanOptions): LayerPlan[] {
  const maxDepth = options.maxDepth ?? DEFAULT_MAX_DEPTH;
  const variant = options.variant ?? "";
  if (!Number.isInteger(maxDepth) || maxDepth < 0 || maxDepth > MAX_MAX_DEPTH) {
    throw new RangeError(
      `max depth must be a whole number from 0 to ${MAX_MAX_DEPTH}, got ${maxDepth}`,
    );
  }
  return options.sizes.map((size, i) => {
    const index = i + 1;
    const root = `layer${index}`;
    const keyBase = `${variant}\0${root}`;
    if (!options.mockFs) {
      const path = `${root}/${formatSize(size)}-file`;
      return {
        index,
        size,
        root,
        dirs: [root],
        files: [{ path, size, key: `${keyBase}/${path}` }],
        mockFs: false,
      };
    }
    const count = options.targetFiles ?? defaultFileCount(size);
    if (count > size) {
      throw new RangeError(
        `layer ${index} is ${size} bytes, too small for ${count} non-empty files`,
      );
    }
    return planMockFs({ index, size, root, keyBase, count, maxDepth, seed: options.seed });
  });
}

/** Uniform float in [0, 1) from the generator. */
function uniform(rng: Xorshift128, scratch: Uint32Array): number {
  rng.fill(new Uint8Array(scratch.buffer));
  return scratch[0] / 2 ** 32;
}

const DIR_NAMES = [
  "bin",
  "etc",
  "lib",
  "usr",
  "share",
  "opt",
  "var",
  "srv",
  "include",
  "local",
  "python3",
  "site-packages",
  "node_modules",
  "locale",
  "doc",
  "man",
  "cache",
  "data",
  "plugins",
  "modules",
  "firmware",
  "x86_64-linux-gnu",
  "perl5",
  "zoneinfo",
  "fonts",
];
const FILE_STEMS = [
  "lib",
  "data",
  "module",
  "index",
  "core",
  "util",
  "asset",
  "blob",
  "chunk",
  "pack",
];
const FILE_EXTS = [".so", ".a", ".py", ".js", ".json", ".txt", ".bin", ".dat", ".conf", ".gz"];

/** Size classes: [share of files, smallest, largest], like a real rootfs. */
const SIZE_CLASSES: ReadonlyArray<readonly [number, number, number]> = [
  [0.80, 1024, 100 * 1024],
  [0.17, 100 * 1024, 10 * 1024 * 1024],
  [0.03, 10 * 1024 * 1024, MAX_MOCK_FILE_SIZE],
];

interface MockFsInput {
  index: number;
  size: number;
  root: string;
  keyBase: string;
  count: number;
  maxDepth: number;
  seed: number;
}

function planMockFs(input: MockFsInput): LayerPlan {
  const { index, size, root, keyBase, count, maxDepth, seed } = input;
  const rng = new Xorshift128(seed, `plan\0${root}`);
  const scratch = new Uint32Array(1);
  const rand = () => uniform(rng, scratch);

  // Directory tree: about one directory per eight files, none deeper than maxDepth.
  const dirs: { path: string; depth: number; children: Set<string> }[] = [
    { path: root, depth: 0, children: new Set() },
  ];
  const dirCount = maxDepth === 0 ? 0 : Math.max(1, Math.ceil(count / 8));
  for (let d = 0; d < dirCount; d++) {
    const candidates = dirs.filter((x) => x.depth < maxDepth);
    const parent = candidates[Math.floor(rand() * candidates.length)];
    let name = DIR_NAMES[Math.floor(rand() * DIR_NAMES.length)];
    for (let n = 2; parent.children.has(name); n++) name = `${name.replace(/-\d+$/, "")}-${n}`;
    parent.children.add(name);
    dirs.push({ path: `${parent.path}/${name}`, depth: parent.depth + 1, children: new Set() });
  }

  const sizes = skewedSizes(size, count, rand);
  const files: PlannedFile[] = sizes.map((fileSize, i) => {
    const dir = dirs[Math.floor(rand() * dirs.length)];
    const stem = FILE_STEMS[Math.floor(rand() * FILE_STEMS.length)];
    const ext = FILE_EXTS[Math.floor(rand() * FILE_EXTS.length)];
    // The index makes every name unique, so no file ever overwrites another.
    const path = `${dir.path}/${stem}-${String(i).padStart(5, "0")}${ext}`;
    return { path, size: fileSize, key: `${keyBase}/${path}` };
  });
  files.sort((a, b) => compareBytes(a.path, b.path));
  const dirPaths = dirs.map((d) => d.path).sort(compareBytes);
  return { index, size, root, dirs: dirPaths, files, mockFs: true };
}

/**
 * Splits `total` bytes into `count` sizes of at least 1 byte, skewed like a
 * real rootfs and summing exactly to `total`.
 */
export function skewedSizes(total: number, count: number, rand: () => number): number[] {
  const weights = Array.from({ length: count }, () => {
    let r = rand();
    for (const [share, lo, hi] of SIZE_CLASSES) {
      if (r < share) return Math.exp(Math.log(lo) + rand() * (Math.log(hi) - Math.log(lo)));
      r -= share;
    }
    return SIZE_CLASSES[0][1];
  });
  const cap = Math.max(MAX_MOCK_FILE_SIZE, Math.ceil(total / count));
  const sizes = new Array<number>(count).fill(1);
  let left = total - count;
  // Water-filling: share the bytes by weight; files that reach the cap drop out.
  let open = sizes.map((_, i) => i);
  while (left > 0 && open.length > 0) {
    const sum = open.reduce((s, i) => s + weights[i], 0);
    let given = 0;
    const next: number[] = [];
    for (const i of open) {
      const share = Math.min(Math.floor((left * weights[i]) / sum), cap - sizes[i]);
      sizes[i] += share;
      given += share;
      if (sizes[i] < cap) next.push(i);
    }
    left -= given;
    open = next;
    if (given === 0) {
      // Rounding left a few bytes: hand them out one by one.
      for (const i of open) {
        if (left === 0) break;
        const add = Math.min(left, cap - sizes[i]);
        sizes[i] += add;
        left -= add;
      }
    }
  }
  return sizes;
}

/** Orders paths by their UTF-8 bytes, as tar readers and Go's sort do. */
export function compareBytes(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
