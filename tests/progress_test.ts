/** Status output: plain lines without a TTY, bars on one, nothing with --quiet. */

import { assert, assertEquals, assertStringIncludes } from "./support/assert.ts";
import { Progress, type ProgressOptions } from "../lib/progress.ts";

const MB = 1024 * 1024;
// deno-lint-ignore no-control-regex
const ANY_ESCAPE = /\x1b/;
// deno-lint-ignore no-control-regex
const COLOUR = /\x1b\[[\d;]*m/;

/** A Progress whose output is collected. */
function capture(options: ProgressOptions): { progress: Progress; text: () => string } {
  const out: string[] = [];
  const progress = new Progress({ ...options, write: (t) => out.push(t) });
  return { progress, text: () => out.join("") };
}

/** Drives one run: stage, info, warn, a big task, a small task, builder output. */
function drive(progress: Progress): void {
  progress.stage("Generating 2 layers");
  progress.info("seed 7");
  progress.warn("careful");
  const big = progress.task("layer1", 64 * MB);
  for (let i = 0; i < 8; i++) big.advance(8 * MB);
  big.done();
  const small = progress.task("layer2", 10 * 1024);
  small.advance(10 * 1024);
  small.done("sha256:abc");
  progress.passthrough("Step 1/2 : FROM scratch\n");
}

/** Runs `fn` with NO_COLOR set to `value` (or unset), restoring it afterwards. */
function withNoColor<T>(value: string | undefined, fn: () => T): T {
  const saved = Deno.env.get("NO_COLOR");
  if (value === undefined) Deno.env.delete("NO_COLOR");
  else Deno.env.set("NO_COLOR", value);
  try {
    return fn();
  } finally {
    if (saved === undefined) Deno.env.delete("NO_COLOR");
    else Deno.env.set("NO_COLOR", saved);
  }
}

Deno.test("Progress without a TTY prints plain lines with no escape codes", () => {
  const { progress, text } = withNoColor(undefined, () => capture({ tty: false }));
  drive(progress);
  const out = text();
  assert(!ANY_ESCAPE.test(out), `no escape codes: ${JSON.stringify(out)}`);
  const lines = out.trimEnd().split("\n");
  assertEquals(lines[0], "==> Generating 2 layers");
  assertEquals(lines[1], "    seed 7");
  assertEquals(lines[2], "warning: careful");
  const big = lines.filter((l) => l.startsWith("    layer1: "));
  assertEquals(big.map((l) => l.split(" ")[5]), ["25%", "50%", "75%", "done,"]);
  assertStringIncludes(big[0], "/s");
  assertEquals(
    lines.filter((l) => l.startsWith("    layer2: ")).length,
    1,
    "a small layer only gets its done line",
  );
  assertStringIncludes(out, "layer2: done, 10.00KB in ");
  assertStringIncludes(out, "sha256:abc");
  assertStringIncludes(out, "Step 1/2 : FROM scratch\n");
});

Deno.test("Progress with --quiet prints nothing at all", async (t) => {
  for (const tty of [false, true]) {
    await t.step(`tty ${tty}`, () => {
      const { progress, text } = capture({ quiet: true, tty });
      drive(progress);
      progress.close();
      assertEquals(text(), "");
      assert(progress.quiet);
    });
  }
});

Deno.test("Progress on a TTY draws bars in colour unless NO_COLOR is set", async (t) => {
  await t.step("colour by default", async () => {
    const { progress, text } = withNoColor(undefined, () => capture({ tty: true }));
    // Bars are redrawn at most every 100 ms since the last draw (the first at 100 ms after start).
    await new Promise((r) => setTimeout(r, 150));
    drive(progress);
    assert(COLOUR.test(text()), "colour codes present");
    assertStringIncludes(text(), "█");
  });
  await t.step("NO_COLOR=1: bars but no colour codes", () => {
    const { progress, text } = withNoColor("1", () => capture({ tty: true }));
    const task = progress.task("layer1", 64 * MB);
    task.advance(16 * MB);
    progress.stage("Building");
    task.done();
    assert(!COLOUR.test(text()), `no colour: ${JSON.stringify(text())}`);
    assertStringIncludes(text(), "░");
  });
  await t.step("close() erases the live bars", () => {
    const { progress, text } = capture({ tty: true, color: false });
    progress.task("layer1", 64 * MB).advance(MB);
    progress.stage("x");
    const before = text().length;
    progress.close();
    assertStringIncludes(text().slice(before), "\x1b[1A\x1b[J");
  });
});
