/**
 * Worker side of the parallel gzip encoder: encodes one {@linkcode GzipJob}
 * per message and transfers the result back.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { encodeGzipJob, type GzipJob } from "./compress.ts";

self.onmessage = (e: MessageEvent<{ id: number; job: GzipJob }>) => {
  const { id, job } = e.data;
  try {
    const out = encodeGzipJob(job);
    // A fresh, whole buffer can be transferred; anything else is copied once.
    const whole = out.byteOffset === 0 && out.byteLength === out.buffer.byteLength;
    const sendable = whole ? out : out.slice();
    // The job's buffer goes back too, for reuse: left here it would only pile up as garbage.
    const input = job.data.buffer as ArrayBuffer;
    self.postMessage({ id, out: sendable, input }, [sendable.buffer as ArrayBuffer, input]);
  } catch (err) {
    self.postMessage({ id, error: err instanceof Error ? err.message : String(err) });
  }
};
