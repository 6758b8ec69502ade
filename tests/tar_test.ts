import assert from "node:assert/strict";
import { run } from "./support/docker.ts";
import { planLayers } from "../lib/plan.ts";
import type { LayerPlan } from "../lib/plan.ts";
import {
  BLOCK_SIZE,
  MAX_USTAR_SIZE,
  runningTarWorkers,
  tarEntries,
  tarHeader,
  tarSegments,
  tarSegmentStream,
  tarSize,
} from "../lib/tar.ts";
import { createHash } from "node:crypto";
import { concat } from "./support/bytes.ts";
import { repeatedSegmentLengths } from "../lib/content.ts";

/** Concatenates the whole tar of a (small) plan. */
function tarBytes(plan: LayerPlan, seed = 1, entropy = 100): Uint8Array {
  return concat([...tarSegments(plan, { seed, entropy })].map((s) => s.bytes));
}

/** A plan with one deep directory chain, so paths exceed the 100-byte name field. */
function longPathPlan(): LayerPlan {
  const dirs = ["layer1"];
  for (let i = 0; i < 6; i++) dirs.push(`${dirs[dirs.length - 1]}/directory-with-a-long-name-${i}`);
  const deep = dirs[dirs.length - 1];
  const files = [
    { path: `${deep}/file-with-a-long-name.bin`, size: 1000, key: "k1" },
    { path: "layer1/short.txt", size: 3, key: "k2" },
  ].sort((a, b) => (a.path < b.path ? -1 : 1));
  return { index: 1, size: 1003, root: "layer1", dirs, files, mockFs: true };
}

/** Parses `tar -tv` lines into [mode, size, name]. */
function listing(text: string): [string, number, string][] {
  return text.trim().split("\n").map((line) => {
    const f = line.split(/\s+/);
    return [f[0], Number(f[2]), f.slice(5).join(" ")];
  });
}

Deno.test("tarSegments() writes archives that GNU tar lists and extracts", async (t) => {
  const plans: [string, LayerPlan][] = [
    ["single file", planLayers({ sizes: [123_457], seed: 3 })[0]],
    ["mock fs", planLayers({ sizes: [3_000_000], seed: 3, mockFs: true, targetFiles: 40 })[0]],
    ["long paths", longPathPlan()],
  ];
  for (const [name, plan] of plans) {
    await t.step(`${name}: entries, order, modes and sizes`, async () => {
      const bytes = tarBytes(plan);
      const res = await run(["tar", "-tvf", "-"], { stdin: bytes });
      assert.deepEqual(res.code, 0, res.stderr);
      const expected = tarEntries(plan).map((e): [string, number, string] =>
        e.type === "dir" ? ["drwxr-xr-x", 0, `${e.path}/`] : ["-rw-r--r--", e.size, e.path]
      );
      assert.deepEqual(listing(res.stdout), expected);
      assert(res.stdout.split("\n").every((l) => l === "" || l.includes(" 0/0 ")));
      assert(res.stdout.split("\n").every((l) => l === "" || l.includes("1970-01-01 00:00")));
    });
    await t.step(`${name}: tarSize() equals the streamed length`, () => {
      assert.deepEqual(tarBytes(plan).length, tarSize(plan));
    });
    await t.step(`${name}: tar -x gives files of the planned sizes`, async () => {
      const dir = await Deno.makeTempDir();
      try {
        const res = await run(["tar", "-xf", "-", "-C", dir], { stdin: tarBytes(plan) });
        assert.deepEqual(res.code, 0, res.stderr);
        for (const f of plan.files) {
          assert.deepEqual((await Deno.stat(`${dir}/${f.path}`)).size, f.size);
        }
        for (const d of plan.dirs) assert((await Deno.stat(`${dir}/${d}`)).isDirectory);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });
  }
});

Deno.test("tarEntries() puts every directory before its children", () => {
  const plan = planLayers({ sizes: [20_000_000], seed: 9, mockFs: true, targetFiles: 300 })[0];
  const seen = new Set<string>();
  for (const e of tarEntries(plan)) {
    const parent = e.path.includes("/") ? e.path.slice(0, e.path.lastIndexOf("/")) : "";
    if (parent !== "") assert(seen.has(parent), `${e.path} comes before ${parent}`);
    if (e.type === "dir") seen.add(e.path);
  }
  assert.deepEqual(seen.size, plan.dirs.length);
});

Deno.test("tarSegments() is deterministic and follows the seed", () => {
  const plan = planLayers({ sizes: [200_000], seed: 1, mockFs: true, targetFiles: 5 })[0];
  const [a, b, other] = [tarBytes(plan, 1), tarBytes(plan, 1), tarBytes(plan, 2)];
  assert.deepEqual(a, b);
  assert.equal(other.length, a.length);
  assert(a.some((byte, i) => byte !== other[i]));
});

Deno.test("tarSegments() tags headers and padding as not random", () => {
  const plan = planLayers({ sizes: [5000], seed: 1 })[0];
  const segs = [...tarSegments(plan, { seed: 1 })];
  assert.deepEqual(segs.map((s) => s.random), [false, false, true, false, false]);
  assert.deepEqual(segs.map((s) => s.bytes.length), [512, 512, 5000, 120, 1024]);
});

Deno.test("tarHeader() uses PAX for long paths and sizes of 8 GiB or more", async (t) => {
  await t.step("a 100-byte name fits ustar, 101 bytes needs PAX path=", () => {
    const fits = tarHeader({ path: "a".repeat(100), type: "file", size: 1 });
    assert.deepEqual(fits.length, BLOCK_SIZE);
    const long = tarHeader({ path: "a".repeat(101), type: "file", size: 1 });
    assert.deepEqual(long.length, 3 * BLOCK_SIZE);
    assert.deepEqual(String.fromCharCode(long[156]), "x");
    const records = new TextDecoder().decode(long.subarray(512, 1024)).replace(/\0+$/, "");
    // 3 digits + space + "path=" + 101 bytes + newline
    assert.equal(records, `111 path=${"a".repeat(101)}\n`);
    assert.equal(records.length, 111);
  });
  await t.step("the largest ustar size needs no PAX, one more byte does", () => {
    assert.deepEqual(
      tarHeader({ path: "f", type: "file", size: MAX_USTAR_SIZE }).length,
      BLOCK_SIZE,
    );
    const big = tarHeader({ path: "f", type: "file", size: MAX_USTAR_SIZE + 1 });
    const records = new TextDecoder().decode(big.subarray(512, 1024)).replace(/\0+$/, "");
    assert.deepEqual(records, `19 size=${MAX_USTAR_SIZE + 1}\n`);
  });
  await t.step("GNU tar lists a sparse 9 GiB archive with the PAX size", async () => {
    const size = 9 * 1024 ** 3 + 5;
    const plan = planLayers({ sizes: [size], seed: 1 })[0];
    const headers = tarSegments(plan, { seed: 1 });
    // Only the headers are real: the data region is a hole, the end blocks are zeros.
    const head: Uint8Array[] = [];
    for (const seg of headers) {
      if (seg.random) break;
      head.push(seg.bytes);
    }
    const path = await Deno.makeTempFile({ suffix: ".tar" });
    try {
      const f = await Deno.open(path, { write: true });
      for (const h of head) await f.write(h);
      await f.truncate(tarSize(plan));
      f.close();
      const res = await run(["tar", "-tvf", path]);
      assert.deepEqual(res.code, 0, res.stderr);
      const entries = listing(res.stdout);
      assert.deepEqual(entries.map((e) => e[2]), ["layer1/", plan.files[0].path]);
      assert.deepEqual(entries[1][1], size);
    } finally {
      await Deno.remove(path);
    }
  });
});

Deno.test("tarSegments() streams an entry of 8 GiB + 1 byte whose length equals tarSize()", () => {
  const size = 8 * 1024 ** 3 + 1;
  const plan = planLayers({ sizes: [size], seed: 1 })[0];
  let total = 0;
  let header = "";
  for (const seg of tarSegments(plan, { seed: 1, entropy: 0 })) {
    if (!seg.random && seg.bytes.length === 3 * BLOCK_SIZE) {
      header = new TextDecoder().decode(seg.bytes.subarray(512, 1024));
    }
    total += seg.bytes.length;
  }
  assert.equal(total, tarSize(plan));
  assert.match(header, new RegExp(`^\\d+ size=${size}\n`));
});

Deno.test("tarSegmentStream() gives tarSegments()' bytes and flags, inline or from a Worker", async (t) => {
  const plans: [string, LayerPlan][] = [
    ["one file", planLayers({ sizes: [3 * 1024 * 1024 + 17], seed: 4 })[0]],
    [
      "a mock fs",
      planLayers({ sizes: [2 * 1024 * 1024], seed: 4, mockFs: true, targetFiles: 300 })[0],
    ],
  ];
  for (const [name, plan] of plans) {
    const want = [...tarSegments(plan, { seed: 4, entropy: 60 })];
    const wantBytes = concat(want.map((s) => s.bytes));
    const wantDigest = `sha256:${createHash("sha256").update(wantBytes).digest("hex")}`;
    for (const workerMinBytes of [Infinity, 0]) {
      const where = workerMinBytes === 0 ? "Worker" : "inline";
      await t.step(
        `${name}, ${where}: same bytes, same random flags, the tar's digest`,
        async () => {
          const stream = tarSegmentStream(plan, {
            seed: 4,
            entropy: 60,
            hash: true,
            workerMinBytes,
          });
          const got = [];
          for await (const seg of stream) got.push(seg);
          assert.deepEqual(concat(got.map((s) => s.bytes)), wantBytes);
          // Random runs, byte by byte, are what the gzip encoder stores: they must match too.
          assert.deepEqual(flagRuns(got), flagRuns(want));
          assert.equal(stream.digest(), wantDigest);
        },
      );
    }
  }
  await t.step("stopping early stops the Worker; digest() then throws", async () => {
    const [plan] = planLayers({ sizes: [64 * 1024 * 1024], seed: 4 });
    const stream = tarSegmentStream(plan, { seed: 4, hash: true, workerMinBytes: 0 });
    let read = 0;
    for await (const seg of stream) {
      assert.equal(runningTarWorkers(), 1);
      read += seg.bytes.length;
      if (read > 2 * 1024 * 1024) break;
    }
    assert.equal(runningTarWorkers(), 0);
    assert.throws(() => stream.digest(), TypeError);
  });
  await t.step("digest() without hash: true is a TypeError", async () => {
    const [plan] = planLayers({ sizes: [1024], seed: 4 });
    const stream = tarSegmentStream(plan, { seed: 4 });
    for await (const _ of stream) { /* read it all */ }
    assert.throws(() => stream.digest(), TypeError);
  });
});

/** Lengths of the runs of equal `random` flags, byte-weighted. */
function flagRuns(segs: { bytes: Uint8Array; random: boolean }[]): [boolean, number][] {
  const runs: [boolean, number][] = [];
  for (const s of segs) {
    if (s.bytes.length === 0) continue;
    const last = runs.at(-1);
    if (last && last[0] === s.random) last[1] += s.bytes.length;
    else runs.push([s.random, s.bytes.length]);
  }
  return runs;
}

Deno.test("tarSegmentStream() refills released buffers without changing the tar", async (t) => {
  const [plan] = planLayers({ sizes: [40 * 1024 * 1024 + 5], seed: 6 });
  // Fully random: 1 MiB chunks; with --entropy the random and pattern runs: both are reused.
  for (const entropy of [100, 50, 30]) {
    await t.step(`entropy ${entropy}`, async () => {
      const want = createHash("sha256");
      for (const seg of tarSegments(plan, { seed: 6, entropy })) want.update(seg.bytes);
      const stream = tarSegmentStream(plan, { seed: 6, entropy, hash: true, workerMinBytes: 0 });
      const reused = new Set(repeatedSegmentLengths(entropy));
      const got = createHash("sha256");
      let handedBack = 0;
      for await (const seg of stream) {
        got.update(seg.bytes);
        // Released at once and refilled by the Worker while later segments are read.
        if (reused.has(seg.bytes.byteLength)) handedBack++;
        stream.release(seg.bytes);
      }
      const digest = `sha256:${want.digest("hex")}`;
      assert.equal(`sha256:${got.digest("hex")}`, digest);
      assert.equal(stream.digest(), digest);
      assert(handedBack > 30, `only ${handedBack} segments of a reused length`);
    });
  }
});
