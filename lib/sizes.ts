/**
 * Parsing and formatting of byte sizes such as `512KB`, `1.5MB` or `2GiB`.
 * Units are binary: 1 KB = 1 KiB = 1024 bytes.
 *
 * @module
 */

/** Binary multipliers by unit, upper-cased. KB and KiB mean the same. */
const UNITS: Readonly<Record<string, bigint>> = {
  B: 1n,
  KB: 1024n,
  KIB: 1024n,
  MB: 1024n ** 2n,
  MIB: 1024n ** 2n,
  GB: 1024n ** 3n,
  GIB: 1024n ** 3n,
  TB: 1024n ** 4n,
  TIB: 1024n ** 4n,
};

/** Most layers one image may have: docker's overlay2 refuses more than 127 lower dirs. */
export const MAX_LAYERS = 127;

const SIZE_RE = /^([+-]?)(\d+)(?:\.(\d+))?\s*([A-Za-z]*)$/;

/**
 * Parses one size into a whole number of bytes.
 *
 * @example
 * ```ts
 * parseSize("1.5MB"); // 1572864
 * ```
 * @throws {RangeError} for zero, negative, too large or fractional-byte sizes.
 * @throws {SyntaxError} for text that is not a number with a known unit.
 */
export function parseSize(text: string): number {
  const trimmed = text.trim();
  if (trimmed === "") throw new SyntaxError("Cannot parse size '': it is empty");
  const m = SIZE_RE.exec(trimmed);
  if (!m) {
    throw new SyntaxError(
      `Cannot parse size '${text}': expected a number and a unit, such as 512KB or 1.5GB`,
    );
  }
  const [, sign, whole, frac = "", unitText] = m;
  const unit = UNITS[(unitText || "B").toUpperCase()];
  if (unit === undefined) {
    throw new SyntaxError(
      `Cannot parse size '${text}': unit must be one of B, KB, MB, GB, TB (or KiB, MiB, GiB, TiB)`,
    );
  }
  if (sign === "-") throw new RangeError(`Cannot use size '${text}': it is negative`);
  const scale = 10n ** BigInt(frac.length);
  const scaled = BigInt(whole + frac) * unit;
  if (scaled % scale !== 0n) {
    throw new RangeError(`Cannot use size '${text}': it is not a whole number of bytes`);
  }
  const bytes = scaled / scale;
  if (bytes === 0n) throw new RangeError(`Cannot use size '${text}': it must be more than 0 bytes`);
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new RangeError(
      `Cannot use size '${text}': it is larger than ${Number.MAX_SAFE_INTEGER} bytes`,
    );
  }
  return Number(bytes);
}

/**
 * Parses a comma-separated list of sizes, e.g. `512KB,100MB,2GB`.
 *
 * @throws {SyntaxError} for an empty list or an empty entry.
 * @throws {RangeError} for more than {@linkcode MAX_LAYERS} entries or a bad size.
 */
export function parseSizeList(text: string): number[] {
  if (text.trim() === "") throw new SyntaxError("Cannot parse size list '': it is empty");
  const parts = text.split(",");
  if (parts.length > MAX_LAYERS) {
    throw new RangeError(
      `Cannot use ${parts.length} layers: at most ${MAX_LAYERS} are allowed`,
    );
  }
  return parts.map((part, i) => {
    if (part.trim() === "") {
      throw new SyntaxError(`Cannot parse size list '${text}': entry ${i + 1} is empty`);
    }
    return parseSize(part);
  });
}

const FORMAT_UNITS = ["B", "KB", "MB", "GB", "TB"] as const;

/**
 * Formats bytes with two decimals in the largest unit that keeps the value
 * at least 1, with no space, e.g. `1.00GB`, `10.00KB`, `512B`.
 */
export function formatSize(bytes: number): string {
  let value = bytes;
  let i = 0;
  while (value >= 1024 && i < FORMAT_UNITS.length - 1) {
    value /= 1024;
    i++;
  }
  return i === 0 ? `${bytes}B` : `${value.toFixed(2)}${FORMAT_UNITS[i]}`;
}
