/**
 * Minimal assertions (JSR's @std/assert is not reachable from these machines).
 *
 * @module
 */

/** Thrown when an assertion fails. */
export class AssertionError extends Error {
  /** Builds the error. */
  constructor(message: string) {
    super(message);
    this.name = "AssertionError";
  }
}

function show(v: unknown): string {
  try {
    return Deno.inspect(v, { depth: 6, colors: false, strAbbreviateSize: 2000 });
  } catch {
    return String(v);
  }
}

/** Deep equality over JSON-like values, arrays, typed arrays, Maps and Sets. */
export function equal(a: unknown, b: unknown): boolean {
  if (Object.is(a, b)) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Object.getPrototypeOf(a) !== Object.getPrototypeOf(b)) return false;
  if (ArrayBuffer.isView(a) && ArrayBuffer.isView(b)) {
    const x = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
    const y = new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
    return x.length === y.length && x.every((v, i) => v === y[i]);
  }
  if (a instanceof Map && b instanceof Map) {
    return a.size === b.size && [...a].every(([k, v]) => b.has(k) && equal(v, b.get(k)));
  }
  if (a instanceof Set && b instanceof Set) {
    return a.size === b.size && [...a].every((v) => b.has(v));
  }
  const ka = Object.keys(a as object);
  const kb = Object.keys(b as object);
  if (ka.length !== kb.length) return false;
  return ka.every((k) =>
    equal((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k])
  );
}

/** Fails unless `actual` deeply equals `expected`. */
export function assertEquals<T>(actual: T, expected: T, msg?: string): void {
  if (!equal(actual, expected)) {
    throw new AssertionError(
      `${msg ? `${msg}: ` : ""}expected ${show(expected)}, got ${show(actual)}`,
    );
  }
}

/** Fails if `actual` deeply equals `unexpected`. */
export function assertNotEquals<T>(actual: T, unexpected: T, msg?: string): void {
  if (equal(actual, unexpected)) {
    throw new AssertionError(`${msg ? `${msg}: ` : ""}expected not ${show(unexpected)}`);
  }
}

/** Fails unless `cond` is truthy. */
export function assert(cond: unknown, msg = "assertion failed"): asserts cond {
  if (!cond) throw new AssertionError(msg);
}

/** Fails unless `text` contains `part`. */
export function assertStringIncludes(text: string, part: string, msg?: string): void {
  if (!text.includes(part)) {
    throw new AssertionError(
      `${msg ? `${msg}: ` : ""}expected ${show(text)} to include ${show(part)}`,
    );
  }
}

/** Fails unless `text` matches `re`. */
export function assertMatch(text: string, re: RegExp, msg?: string): void {
  if (!re.test(text)) {
    throw new AssertionError(`${msg ? `${msg}: ` : ""}expected ${show(text)} to match ${re}`);
  }
}

// deno-lint-ignore no-explicit-any
type ErrorClass = new (...args: any[]) => Error;

/** Fails unless `fn` throws an instance of `type` whose message includes `includes`. */
export function assertThrows(fn: () => unknown, type?: ErrorClass, includes?: string): Error {
  try {
    fn();
  } catch (e) {
    check(e, type, includes);
    return e as Error;
  }
  throw new AssertionError("expected the function to throw");
}

/** Fails unless the promise rejects with an instance of `type` whose message includes `includes`. */
export async function assertRejects(
  fn: () => Promise<unknown>,
  type?: ErrorClass,
  includes?: string,
): Promise<Error> {
  try {
    await fn();
  } catch (e) {
    check(e, type, includes);
    return e as Error;
  }
  throw new AssertionError("expected the promise to reject");
}

function check(e: unknown, type?: ErrorClass, includes?: string): void {
  if (type && !(e instanceof type)) {
    throw new AssertionError(`expected ${type.name}, got ${show(e)}`);
  }
  if (includes && !(e instanceof Error && e.message.includes(includes))) {
    throw new AssertionError(
      `expected message to include ${show(includes)}, got ${show((e as Error)?.message)}`,
    );
  }
}
