/**
 * The command line, run as a user runs it: the real `main.ts` in a child
 * process, checked by exit code, stdout, stderr and what is left on disk.
 */

import {
  assert,
  assertEquals,
  assertMatch,
  assertNotEquals,
  assertStringIncludes,
} from "./support/assert.ts";
import { listDir, runCli, withTempDir, withTmpfs, writeScript } from "./support/cli.ts";
import { requireDocker, run } from "./support/docker.ts";

/** A valid reference used by the bad-input cases whose reference is fine. */
const REF = "test/imgmkr-bad:v1";
const SHA = "a".repeat(64);

/** Asserts the usage-error shape: exit 2, nothing on stdout, one error line plus a hint line. */
function assertUsageError(
  r: { code: number; stdout: string; stderr: string },
  mentions: string[],
  options: { afterStatus?: boolean } = {},
): void {
  assertEquals(r.code, 2, `exit code (stderr: ${r.stderr})`);
  assertEquals(r.stdout, "", "stdout");
  let lines = r.stderr.trimEnd().split("\n");
  if (options.afterStatus) {
    // Checked after validation: only status lines ("==> ", "    ") may come first.
    const status = lines.slice(0, -2);
    assert(status.every((l) => /^(==> | {4})/.test(l)), `only status lines first: ${r.stderr}`);
    lines = lines.slice(-2);
  }
  assertEquals(lines.length, 2, `stderr is one error line and one hint line: ${r.stderr}`);
  assertMatch(lines[0], /^imgmkr: /);
  for (const m of mentions) assertStringIncludes(lines[0], m);
  assertMatch(lines[1], /^hint: /);
}

Deno.test("every bad input exits 2 with a one-line error naming the flag, a hint, and writes nothing", async (t) => {
  const cases: [string, string[], string[]][] = [
    ["missing --layer-sizes", [REF], ["--layer-sizes"]],
    ["an empty --layer-sizes", ["--layer-sizes", "", REF], ["--layer-sizes", "empty"]],
    ["--layer-sizes ','", ["--layer-sizes", ",", REF], ["--layer-sizes", "empty"]],
    ["an empty entry", ["--layer-sizes", "1KB,,2KB", REF], ["--layer-sizes", "entry 2"]],
    ["a zero size", ["--layer-sizes", "0", REF], ["--layer-sizes", "'0'"]],
    ["a negative size as two args", ["--layer-sizes", "-1KB", REF], ["--layer-sizes", "negative"]],
    ["a negative size with '='", ["--layer-sizes=-1KB", REF], ["--layer-sizes", "negative"]],
    ["NaN", ["--layer-sizes", "NaN", REF], ["--layer-sizes", "'NaN'"]],
    ["Infinity", ["--layer-sizes", "Infinity", REF], ["--layer-sizes", "'Infinity'"]],
    ["a fraction of a byte", ["--layer-sizes", "0.5B", REF], ["--layer-sizes", "whole number"]],
    ["an unknown unit", ["--layer-sizes", "10XB", REF], ["--layer-sizes", "unit must be"]],
    ["a space inside a number", ["--layer-sizes", "1 0MB", REF], ["--layer-sizes", "'1 0MB'"]],
    [
      "128 layers",
      ["--layer-sizes", Array(128).fill("1KB").join(","), REF],
      ["--layer-sizes", "127"],
    ],
    ["an upper-case repository", ["--layer-sizes", "1KB", "UPPER:tag"], ["UPPER:tag"]],
    ["two colons", ["--layer-sizes", "1KB", "a:b:c"], ["a:b:c"]],
    ["a digest reference", ["--layer-sizes", "1KB", `repo@sha256:${SHA}`], ["repo@sha256"]],
    ["no reference", ["--layer-sizes", "1KB"], ["reference"]],
    ["two references", ["--layer-sizes", "1KB", REF, "test/other:v1"], ["reference"]],
    ["--max-concurrent 0", ["--layer-sizes", "1KB", "--max-concurrent", "0", REF], [
      "--max-concurrent",
    ]],
    ["a missing --tmpdir-prefix dir", [
      "--layer-sizes",
      "1KB",
      "--tmpdir-prefix",
      "/nonexistent/imgmkr",
      REF,
    ], ["--tmpdir-prefix", "does not exist"]],
    [
      "a file as --tmpdir-prefix",
      ["--layer-sizes", "1KB", "--tmpdir-prefix", "/etc/hostname", REF],
      [
        "--tmpdir-prefix",
        "not a directory",
      ],
    ],
    ["--builder bogus", ["--layer-sizes", "1KB", "--builder", "bogus", REF], [
      "--builder",
      "bogus",
    ]],
    [
      "more mock-fs files than bytes",
      ["--mock-fs", "--target-files", "11", "--layer-sizes", "10B", REF],
      ["--target-files"],
    ],
    ["--max-depth without --mock-fs", ["--layer-sizes", "1KB", "--max-depth", "2", REF], [
      "--max-depth",
      "--mock-fs",
    ]],
    ["an unknown flag", ["--layer-sizes", "1KB", "--frobnicate", REF], ["--frobnicate"]],
    ["--seed -1", ["--layer-sizes", "1KB", "--seed", "-1", REF], ["--seed"]],
    ["--seed 1.5", ["--layer-sizes", "1KB", "--seed", "1.5", REF], ["--seed"]],
    ["--platform bogus", ["--layer-sizes", "1KB", "--platform", "bogus", REF], ["--platform"]],
    ["an unknown --output", ["--layer-sizes", "1KB", "--output", "s3:x", REF], ["--output"]],
    ["build with another output", [
      "--layer-sizes",
      "1KB",
      "--output",
      "build",
      "--output",
      "load",
      REF,
    ], [
      "--output build",
    ]],
    ["several platforms on the build path", [
      "--layer-sizes",
      "1KB",
      "--platform",
      "linux/amd64,linux/arm64",
      REF,
    ], ["--platform", "native output"]],
    ["--compression bogus", [
      "--layer-sizes",
      "1KB",
      "--output",
      "load",
      "--compression",
      "lz4",
      REF,
    ], [
      "--compression",
    ]],
    ["--entropy 101", ["--layer-sizes", "1KB", "--entropy", "101", REF], ["--entropy"]],
    ["--retries without push", ["--layer-sizes", "1KB", "--retries", "2", REF], [
      "--retries",
      "--output push",
    ]],
    ["--username without --password-stdin", [
      "--layer-sizes",
      "1KB",
      "--output",
      "push",
      "--username",
      "u",
      "localhost:5000/t/n:1",
    ], ["--username", "--password-stdin"]],
    ["--plain-http with --ca-cert", [
      "--layer-sizes",
      "1KB",
      "--output",
      "push",
      "--plain-http",
      "--ca-cert",
      "/etc/hostname",
      "localhost:5000/t/n:1",
    ], ["--plain-http", "--ca-cert"]],
    ["--chunk-size 0", [
      "--layer-sizes",
      "1KB",
      "--output",
      "push",
      "--chunk-size",
      "0",
      "localhost:5000/t/n:1",
    ], ["--chunk-size"]],
  ];
  for (const [name, args, mentions] of cases) {
    await t.step(name, async () => {
      await withTempDir(async (tmp) => {
        const r = await runCli(args, { env: { TMPDIR: tmp } });
        assertUsageError(r, mentions);
        assertEquals(listDir(tmp), [], "TMPDIR stays empty");
      });
    });
  }

  await t.step("a read-only --tmpdir-prefix", async () => {
    await withTmpfs("1m", async (ro) => {
      await withTempDir(async (tmp) => {
        const r = await runCli(["--layer-sizes", "1KB", "--tmpdir-prefix", ro, REF], {
          env: { TMPDIR: tmp },
        });
        assertUsageError(r, ["--tmpdir-prefix", "not writable"]);
        assertEquals(listDir(tmp), []);
        assertEquals(listDir(ro), []);
      });
    }, { readOnly: true });
  });

  await t.step("no builder on PATH names --dry-run", async () => {
    await withTempDir(async (tmp) => {
      const empty = await Deno.makeTempDir({ dir: tmp });
      const r = await runCli(["--layer-sizes", "1KB", REF], { env: { TMPDIR: tmp, PATH: empty } });
      assertUsageError(r, ["No image builder", "--dry-run", "finch"], { afterStatus: true });
      assertEquals(listDir(tmp), [empty.split("/").at(-1)!], "nothing but the empty PATH dir");
      assertEquals(listDir(empty), []);
    });
  });

  await t.step("--builder docker not on PATH", async () => {
    await withTempDir(async (tmp) => {
      const empty = await Deno.makeTempDir({ dir: tmp });
      const r = await runCli(["--layer-sizes", "1KB", "--builder", "docker", REF], {
        env: { TMPDIR: tmp, PATH: empty },
      });
      assertUsageError(r, ["--builder docker", "not on PATH"], { afterStatus: true });
      assertEquals(listDir(empty), []);
    });
  });

  await t.step("--password-stdin with an empty stdin", async () => {
    await withTempDir(async (tmp) => {
      const r = await runCli(
        [
          "--layer-sizes",
          "1KB",
          "--output",
          "push",
          "--username",
          "u",
          "--password-stdin",
          "localhost:5000/t/n:1",
        ],
        { env: { TMPDIR: tmp }, stdin: "\n" },
      );
      assertUsageError(r, ["--password-stdin", "empty"], { afterStatus: true });
      assertEquals(listDir(tmp), []);
    });
  });

  await t.step("no image got the reference's tag", async () => {
    await requireDocker();
    const r = await run(["docker", "image", "inspect", REF]);
    assertNotEquals(r.code, 0, `${REF} must not exist`);
  });
});

Deno.test("--help prints usage with examples to stdout and exits 0", async (t) => {
  for (const flag of ["--help", "-h"]) {
    await t.step(flag, async () => {
      const r = await runCli([flag]);
      assertEquals(r.code, 0);
      assertEquals(r.stderr, "");
      for (
        const part of ["Usage:", "--layer-sizes", "--tmpdir-prefix", "Examples:", "Exit codes"]
      ) {
        assertStringIncludes(r.stdout, part);
      }
    });
  }
});

Deno.test("--version prints the version in deno.json", async () => {
  const denoJson = JSON.parse(
    await Deno.readTextFile(new URL("../deno.json", import.meta.url)),
  );
  const r = await runCli(["--version"]);
  assertEquals(r.code, 0);
  assertEquals(r.stdout, `imgmkr ${denoJson.version}\n`);
});

Deno.test("--dry-run prints the plan and the Dockerfile, the same with flags after the reference, and writes nothing", async () => {
  await requireDocker();
  const ref = "test/imgmkr-dry:v1";
  await withTempDir(async (tmp) => {
    const prefix = await Deno.makeTempDir({ dir: tmp, prefix: "prefix-" });
    const before = await runCli(
      ["--layer-sizes", "10KB,1.5MB", "--seed", "3", "--tmpdir-prefix", prefix, "--dry-run", ref],
      { env: { TMPDIR: tmp } },
    );
    const after = await runCli(
      [ref, "--layer-sizes", "10KB,1.5MB", "--seed", "3", "--tmpdir-prefix", prefix, "--dry-run"],
      { env: { TMPDIR: tmp } },
    );
    assertEquals(before.code, 0, before.stderr);
    assertEquals(after.code, 0, after.stderr);
    assertEquals(after.stdout, before.stdout, "flags after the reference mean the same");
    for (
      const part of [
        "layer 1: 10.00KB (10240 bytes) in 1 file",
        "10240  /layer1/10.00KB-file",
        "layer 2: 1.50MB (1572864 bytes) in 1 file",
        "1572864  /layer2/1.50MB-file",
        "FROM scratch\nADD layer1 /\nADD layer2 /\n",
      ]
    ) {
      assertStringIncludes(before.stdout, part);
    }
    assertEquals(listDir(tmp), [prefix.split("/").at(-1)!]);
    assertEquals(listDir(prefix), []);
  });
  assertNotEquals((await run(["docker", "image", "inspect", ref])).code, 0, "nothing was built");
});

Deno.test("--dry-run --mock-fs plans exactly --target-files files summing to the layer size", async () => {
  const r = await runCli([
    "--layer-sizes",
    "30MB",
    "--mock-fs",
    "--target-files",
    "200",
    "--seed",
    "9",
    "--dry-run",
    "test/imgmkr-dry:v2",
  ]);
  assertEquals(r.code, 0, r.stderr);
  const sizes = [...r.stdout.matchAll(/^\s+(\d+)\s+\/layer1\/\S+$/gm)].map((m) => Number(m[1]));
  assertEquals(sizes.length, 200);
  assertEquals(sizes.reduce((a, b) => a + b, 0), 30 * 1024 * 1024);
  assert(sizes.every((s) => s > 0), "no empty file");
});

Deno.test("an unreachable docker daemon is reported before any data is generated, exit 1", async () => {
  await withTempDir(async (tmp) => {
    const r = await runCli(["--layer-sizes", "10KB", "--builder", "docker", REF], {
      env: { TMPDIR: tmp, DOCKER_HOST: "unix:///nonexistent.sock" },
    });
    assertEquals(r.code, 1, r.stderr);
    assertStringIncludes(r.stderr, "daemon is not reachable");
    assert(!r.stderr.includes("Generating"), `nothing generated: ${r.stderr}`);
    assertEquals(r.stdout, "");
    assertEquals(listDir(tmp), []);
  });
});

Deno.test("a failing builder exits 1 with its output, and the build dir is removed", async () => {
  await withTempDir(async (tmp) => {
    const bin = await Deno.makeTempDir({ dir: tmp, prefix: "bin-" });
    const work = await Deno.makeTempDir({ dir: tmp, prefix: "work-" });
    // A fake docker: the daemon answers, no image exists, and the build fails.
    writeScript(
      bin,
      "docker",
      `case "$1" in info) exit 0;; build) echo "boom: the build broke" >&2; exit 3;; esac; exit 1`,
    );
    const r = await runCli(["--layer-sizes", "1MB,10KB", "--builder", "docker", REF], {
      env: { TMPDIR: work, PATH: bin },
    });
    assertEquals(r.code, 1, r.stderr);
    assertStringIncludes(r.stderr, "exit code 3");
    assertStringIncludes(r.stderr, "boom: the build broke");
    assertStringIncludes(r.stderr, "Generating");
    assertEquals(r.stdout, "");
    assertEquals(listDir(work), [], "no imgmkr-build-* left");
  });
});

Deno.test("a too-small --tmpdir-prefix fails with a disk-space error and leaves it empty", async () => {
  await requireDocker();
  await withTmpfs("8m", async (small) => {
    const r = await runCli([
      "--layer-sizes",
      "20MB",
      "--builder",
      "docker",
      "--tmpdir-prefix",
      small,
      REF,
    ]);
    assertEquals(r.code, 1, r.stderr);
    assertMatch(r.stderr, /Not enough disk space|No space left/);
    assertStringIncludes(r.stderr, small);
    assertEquals(listDir(small), []);
  });
  assertNotEquals((await run(["docker", "image", "inspect", REF])).code, 0);
});
