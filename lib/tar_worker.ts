/**
 * Worker side of {@linkcode tarSegmentStream}: generates the tar of one plan
 * and posts it in batches, transferring the buffers, never more than the
 * allowed number of batches ahead of the consumer.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { createHash, type Hash } from "node:crypto";
import type { Segment } from "./content.ts";
import type { LayerPlan } from "./plan.ts";
import { TAR_BATCH_BYTES, TAR_SPARE_BYTES, tarSegments, type TarWorkerReply } from "./tar.ts";

/** The request that starts the generation. */
interface Start {
  plan: LayerPlan;
  seed: number;
  entropy: number;
  hash: boolean;
  ahead: number;
}

let segments: Generator<Segment> | undefined;
let hash: Hash | undefined;
let credit = 0;
/** Buffers handed back, by size, refilled before a new one of that size is allocated. */
const spare = new Map<number, ArrayBuffer[]>();
let spareBytes = 0;

function alloc(length: number): Uint8Array {
  const reused = spare.get(length)?.pop();
  if (!reused) return new Uint8Array(length);
  spareBytes -= length;
  return new Uint8Array(reused);
}

function keep(buffer: ArrayBuffer): void {
  // Sizes that never come again (mock-fs files) must not pile up: beyond the cap, drop.
  if (spareBytes + buffer.byteLength > TAR_SPARE_BYTES) return;
  const list = spare.get(buffer.byteLength) ?? [];
  list.push(buffer);
  spare.set(buffer.byteLength, list);
  spareBytes += buffer.byteLength;
}

// "more" asks for one more batch; an ArrayBuffer is one the consumer is done with. (Plain
// messages: object messages to a Worker made its memory grow by some 100 MB, measured.)
self.onmessage = (e: MessageEvent<Start | "more" | ArrayBuffer>) => {
  if (e.data === "more") {
    credit++;
  } else if (e.data instanceof ArrayBuffer) {
    keep(e.data);
    return;
  } else {
    const { plan, seed, entropy } = e.data;
    segments = tarSegments(plan, { seed, entropy, alloc });
    hash = e.data.hash ? createHash("sha256") : undefined;
    credit = e.data.ahead;
  }
  try {
    while (credit > 0 && segments) {
      credit--;
      const batch: Segment[] = [];
      let bytes = 0;
      let done: string | undefined;
      while (bytes < TAR_BATCH_BYTES) {
        const next = segments.next();
        if (next.done) {
          done = hash ? `sha256:${hash.digest("hex")}` : "";
          segments = undefined;
          break;
        }
        hash?.update(next.value.bytes);
        batch.push(next.value);
        bytes += next.value.bytes.length;
      }
      const transfer = new Set(batch.map((s) => s.bytes.buffer as ArrayBuffer));
      self.postMessage({ batch, done } satisfies TarWorkerReply, [...transfer]);
    }
  } catch (err) {
    segments = undefined;
    self.postMessage(
      { error: err instanceof Error ? err.message : String(err) } satisfies TarWorkerReply,
    );
  }
};
