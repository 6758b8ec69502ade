/** Bounded concurrency with fail-fast. */

import { assert, assertEquals, assertRejects } from "./support/assert.ts";
import { mapConcurrent } from "../lib/pool.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Resolves after `ms`, or rejects with the signal's reason when it aborts first. */
function abortableSleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      reject(signal.reason);
    }, { once: true });
  });
}

Deno.test("mapConcurrent() never runs more than the limit at once", async (t) => {
  for (const limit of [1, 2, 5]) {
    await t.step(`limit ${limit}`, async () => {
      let running = 0;
      let peak = 0;
      await mapConcurrent(Array.from({ length: 12 }, (_, i) => i), async () => {
        peak = Math.max(peak, ++running);
        await sleep(5);
        running--;
      }, { limit });
      assertEquals(peak, limit);
    });
  }
});

Deno.test("mapConcurrent() returns results in input order whatever the finishing order", async () => {
  const items = [30, 1, 20, 5, 10, 0];
  const out = await mapConcurrent(items, async (ms, i) => {
    await sleep(ms);
    return `${i}:${ms}`;
  }, { limit: 3 });
  assertEquals(out, items.map((ms, i) => `${i}:${ms}`));
});

Deno.test("mapConcurrent() handles an empty list and a limit above the item count", async () => {
  assertEquals(await mapConcurrent([], () => Promise.resolve(1), { limit: 4 }), []);
  assertEquals(await mapConcurrent([1, 2], (x) => Promise.resolve(x * 2), { limit: 50 }), [2, 4]);
});

Deno.test("mapConcurrent() aborts the others on the first failure and throws that failure", async () => {
  const started: number[] = [];
  const aborted: number[] = [];
  const boom = new Error("boom");
  const e = await assertRejects(() =>
    mapConcurrent(Array.from({ length: 10 }, (_, i) => i), async (i, _n, signal) => {
      started.push(i);
      if (i === 1) {
        await sleep(10);
        throw boom;
      }
      try {
        await abortableSleep(5_000, signal);
      } catch (reason) {
        aborted.push(i);
        throw new Error(`aborted ${i}`, { cause: reason });
      }
    }, { limit: 3 })
  );
  assert(e === boom, `the first failure is thrown, got ${e.message}`);
  assertEquals(started, [0, 1, 2], "no new item starts after the failure");
  assertEquals(aborted.sort(), [0, 2], "the running ones saw the abort");
});

Deno.test("mapConcurrent() stops on the outer signal with its reason", async (t) => {
  await t.step("aborted while running", async () => {
    const controller = new AbortController();
    const reason = new Error("Ctrl-C");
    let started = 0;
    setTimeout(() => controller.abort(reason), 20);
    const e = await assertRejects(() =>
      mapConcurrent([1, 2, 3, 4], async (_x, _i, signal) => {
        started++;
        await abortableSleep(5_000, signal);
      }, { limit: 2, signal: controller.signal })
    );
    assert(e === reason, `got ${e.message}`);
    assertEquals(started, 2);
  });
  await t.step("already aborted: nothing runs", async () => {
    const controller = new AbortController();
    controller.abort(new Error("early"));
    let calls = 0;
    await assertRejects(
      () =>
        mapConcurrent([1, 2], () => Promise.resolve(calls++), {
          limit: 2,
          signal: controller.signal,
        }),
      Error,
      "early",
    );
    assertEquals(calls, 0);
  });
  await t.step("the outer listener is removed afterwards", async () => {
    const controller = new AbortController();
    await mapConcurrent([1], () => Promise.resolve(1), { limit: 1, signal: controller.signal });
    controller.abort(); // must not throw or reject anything now
  });
});
