/**
 * Worker side of the parallel gzip encoder: encodes one {@linkcode GzipJob}
 * per message and transfers the result back.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { encodeGzipJob, type GzipJob } from "./compress.ts";

self.onmessage = (e: MessageEvent<{ id: number; job: GzipJob; spare?: ArrayBuffer }>) => {
  const { id, job, spare } = e.data;
  try {
    // Into the spare output buffer the caller sent back, when it fits.
    const out = encodeGzipJob(job, spare);
    // The job's buffer (and a spare the output did not need) go back too, for reuse: left here
    // they would only pile up as garbage.
    const input = job.data.buffer as ArrayBuffer;
    const unused = spare && out.buffer !== spare ? spare : undefined;
    const transfer = [out.buffer as ArrayBuffer, input, ...(unused ? [unused] : [])];
    self.postMessage({ id, out, input, unused }, transfer);
  } catch (err) {
    self.postMessage({ id, error: err instanceof Error ? err.message : String(err) });
  }
};
