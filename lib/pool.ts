/**
 * Bounded concurrency with fail-fast: the first failure aborts the others.
 *
 * @module
 */

/** Options for {@linkcode mapConcurrent}. */
export interface MapConcurrentOptions {
  /** Most items in flight at once (at least 1). */
  limit: number;
  /**
   * An outer signal (e.g. Ctrl-C); aborting it stops new work and aborts running work.
   * @default {undefined}
   */
  signal?: AbortSignal;
}

/**
 * Runs `fn` over `items` with at most `limit` running at once, and returns
 * the results in input order. On the first failure, the signal handed to the
 * other calls is aborted, no new item starts, and that first error is thrown
 * once every running call has settled.
 */
export async function mapConcurrent<T, R>(
  items: readonly T[],
  fn: (item: T, index: number, signal: AbortSignal) => Promise<R>,
  options: MapConcurrentOptions,
): Promise<R[]> {
  const controller = new AbortController();
  const outer = options.signal;
  const onOuter = () => controller.abort(outer?.reason);
  if (outer?.aborted) onOuter();
  outer?.addEventListener("abort", onOuter);
  const results = new Array<R>(items.length);
  let next = 0;
  let failure: { error: unknown } | undefined;
  const worker = async () => {
    while (!controller.signal.aborted && next < items.length) {
      const i = next++;
      try {
        results[i] = await fn(items[i], i, controller.signal);
      } catch (error) {
        failure ??= { error };
        controller.abort(error);
      }
    }
  };
  try {
    const n = Math.max(1, Math.min(options.limit, items.length));
    await Promise.all(Array.from({ length: n }, worker));
  } finally {
    outer?.removeEventListener("abort", onOuter);
  }
  if (failure) throw failure.error;
  if (controller.signal.aborted) throw controller.signal.reason;
  return results;
}
