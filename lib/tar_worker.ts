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
import { TAR_BATCH_BYTES, tarSegments, type TarWorkerReply } from "./tar.ts";

let segments: Generator<Segment> | undefined;
let hash: Hash | undefined;
let credit = 0;

self.onmessage = (
  e: MessageEvent<
    "more" | { plan: LayerPlan; seed: number; entropy: number; hash: boolean; ahead: number }
  >,
) => {
  if (e.data === "more") {
    credit++;
  } else {
    segments = tarSegments(e.data.plan, { seed: e.data.seed, entropy: e.data.entropy });
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
