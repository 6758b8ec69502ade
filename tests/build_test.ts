/**
 * The Dockerfile path end to end on real builders (docker and podman), checked
 * with the builders' own tools: `image inspect` for the config and layers, and
 * `save` piped through the `tar` CLI for the exact files of every layer.
 */

import {
  assert,
  assertEquals,
  assertMatch,
  assertNotEquals,
  assertRejects,
  assertStringIncludes,
} from "./support/assert.ts";
import { listDir, runCli, withTempDir, withTmpfs, writeScript } from "./support/cli.ts";
import { requireDocker, run } from "./support/docker.ts";
import { BUILD_DIR_PREFIX, runBuild, writeLayerFiles } from "../lib/build.ts";
import { planLayers } from "../lib/plan.ts";
import { Progress } from "../lib/progress.ts";

type Engine = "docker" | "podman";

/** One regular file of a layer: path without leading slash, and size. */
type FileEntry = [path: string, size: number];

/** The plan `--dry-run` prints, per layer: its files, sorted. */
async function dryRunPlan(args: string[]): Promise<FileEntry[][]> {
  const r = await runCli([...args, "--dry-run"]);
  assertEquals(r.code, 0, r.stderr);
  const layers: FileEntry[][] = [];
  for (const line of r.stdout.split("\n")) {
    if (/^layer \d+:/.test(line)) layers.push([]);
    const m = /^\s+(\d+)\s+\/(\S+)$/.exec(line);
    if (m) layers.at(-1)!.push([m[2], Number(m[1])]);
  }
  return layers.map((l) => l.sort());
}

interface Inspected {
  Architecture: string;
  Os: string;
  RootFS: { Layers: string[] };
}

async function inspect(engine: Engine, tag: string): Promise<Inspected> {
  const r = await run([engine, "image", "inspect", tag]);
  assertEquals(r.code, 0, `${engine} image inspect ${tag}: ${r.stderr}`);
  return JSON.parse(r.stdout)[0];
}

async function exists(engine: Engine, tag: string): Promise<boolean> {
  return (await run([engine, "image", "inspect", tag])).code === 0;
}

async function rmi(engine: Engine, ...tags: string[]): Promise<void> {
  for (const tag of tags) await run([engine, "rmi", "-f", tag]);
}

/**
 * The regular files of every layer, in layer order, read with `<engine> save`
 * and `tar -tv` (a docker-archive: manifest.json lists the layer tars in order).
 */
async function savedLayerFiles(engine: Engine, tag: string): Promise<FileEntry[][]> {
  return await withTempDir(async (dir) => {
    const save = await run([engine, "save", "-o", `${dir}/image.tar`, tag]);
    assertEquals(save.code, 0, save.stderr);
    const x = await run(["tar", "-xf", `${dir}/image.tar`, "-C", dir]);
    assertEquals(x.code, 0, x.stderr);
    const manifest = JSON.parse(await Deno.readTextFile(`${dir}/manifest.json`));
    const layers: FileEntry[][] = [];
    for (const layer of manifest[0].Layers as string[]) {
      const list = await run(["tar", "-tvf", `${dir}/${layer}`, "--numeric-owner"]);
      assertEquals(list.code, 0, list.stderr);
      const files: FileEntry[] = [];
      for (const line of list.stdout.split("\n")) {
        // -rw-r--r-- 0/0    20971520 1970-01-01 00:00 layer1/20.00MB-file
        const m = /^-\S+\s+\S+\s+(\d+)\s+\S+\s+\S+\s+(.+)$/.exec(line);
        if (m) files.push([m[2].replace(/^\.?\//, ""), Number(m[1])]);
      }
      layers.push(files.sort());
    }
    return layers;
  });
}

/** Builds with the CLI into a fresh TMPDIR and checks success and cleanup. */
async function build(
  args: string[],
  env: Record<string, string | undefined> = {},
): Promise<{ stdout: string; stderr: string }> {
  return await withTempDir(async (tmp) => {
    const r = await runCli(args, { env: { TMPDIR: tmp, ...env } });
    assertEquals(r.code, 0, `imgmkr ${args.join(" ")}: ${r.stderr}`);
    assertEquals(listDir(tmp), [], `no ${BUILD_DIR_PREFIX}* left in TMPDIR`);
    return r;
  });
}

for (const engine of ["docker", "podman"] as const) {
  Deno.test(`${engine}: builds 3 distinct layers with exact file sizes, reproducible under --seed`, async (t) => {
    if (engine === "docker") await requireDocker();
    const base = `test/imgmkr-${engine}`;
    const [a, b, c] = [`${base}:a`, `${base}:b`, `${base}:c`];
    const sizes = ["--layer-sizes", "20MB,5MB,10KB"];
    try {
      const plan = await dryRunPlan([...sizes, "--seed", "7", a]);
      assertEquals(plan, [
        [["layer1/20.00MB-file", 20 * 1024 * 1024]],
        [["layer2/5.00MB-file", 5 * 1024 * 1024]],
        [["layer3/10.00KB-file", 10 * 1024]],
      ]);
      let first: string[] = [];
      await t.step("the image has 3 layers, linux/amd64, distinct diff IDs", async () => {
        const { stdout, stderr } = await build([...sizes, "--seed", "7", "--builder", engine, a]);
        assertEquals(stdout, `${a}\n`, "the reference is the only thing on stdout");
        for (const stage of ["Validated", "Generating", "Dockerfile", "Building", "Cleaning up"]) {
          assertStringIncludes(stderr, stage);
        }
        const img = await inspect(engine, a);
        assertEquals(img.RootFS.Layers.length, 3);
        assertEquals([img.Os, img.Architecture], ["linux", "amd64"]);
        assertEquals(new Set(img.RootFS.Layers).size, 3, "distinct diff IDs");
        first = img.RootFS.Layers;
      });
      await t.step(
        `each layer holds exactly its planned file, byte-exact (${engine} save)`,
        async () => {
          assertEquals(await savedLayerFiles(engine, a), plan);
        },
      );
      await t.step(
        "the same seed gives the same diff IDs (and --quiet prints no status)",
        async () => {
          // Remove the first image (and with it the build cache) so nothing is reused.
          await rmi(engine, a);
          const r = await build([...sizes, "--seed", "7", "--quiet", "--builder", engine, b]);
          assertEquals([r.stdout, r.stderr], [`${b}\n`, ""]);
          assertEquals((await inspect(engine, b)).RootFS.Layers, first);
        },
      );
      await t.step("another seed gives other diff IDs for every layer", async () => {
        await build([...sizes, "--seed", "8", "--builder", engine, c]);
        const other = (await inspect(engine, c)).RootFS.Layers;
        assertEquals(other.filter((d) => first.includes(d)), []);
      });
    } finally {
      await rmi(engine, a, b, c);
    }
  });
}

Deno.test("docker: --mock-fs layers hold exactly the files and sizes --dry-run plans", async () => {
  await requireDocker();
  const tag = "test/imgmkr-mockfs:v1";
  const args = [
    "--layer-sizes",
    "30MB,1MB",
    "--mock-fs",
    "--target-files",
    "200",
    "--seed",
    "5",
    "--builder",
    "docker",
    tag,
  ];
  try {
    const plan = await dryRunPlan(args);
    assertEquals(plan.map((l) => l.length), [200, 200]);
    await build(args);
    const saved = await savedLayerFiles("docker", tag);
    assertEquals(saved.map((l) => l.length), [200, 200]);
    assertEquals(saved, plan);
    assertEquals(saved[0].reduce((s, [, n]) => s + n, 0), 30 * 1024 * 1024);
  } finally {
    await rmi("docker", tag);
  }
});

Deno.test("the default builder is finch when it is on PATH; --builder docker skips it", async (t) => {
  await requireDocker();
  const tag = "test/imgmkr-finch:v1";
  await withTempDir(async (bin) => {
    const log = `${bin}/finch.log`;
    // A stand-in finch: logs its arguments, then forwards to the real docker.
    writeScript(bin, "finch", `echo "$*" >> '${log}'\nexec docker "$@"`);
    const env = { PATH: `${bin}:${Deno.env.get("PATH")}` };
    try {
      await t.step("without --builder, finch is checked and builds the image", async () => {
        await build(["--layer-sizes", "10KB", "--seed", "1", tag], env);
        const calls = (await Deno.readTextFile(log)).split("\n");
        assert(calls.includes("info"), `finch info ran: ${calls}`);
        assert(calls.some((c) => c.startsWith("build --platform linux/amd64 -t")), `${calls}`);
        assertEquals((await inspect("docker", tag)).RootFS.Layers.length, 1);
      });
      await t.step("with --builder docker, finch is not run", async () => {
        await Deno.remove(log);
        await rmi("docker", tag);
        await build(["--layer-sizes", "10KB", "--seed", "1", "--builder", "docker", tag], env);
        await assertRejects(() => Deno.stat(log), Deno.errors.NotFound);
        assertEquals((await inspect("docker", tag)).RootFS.Layers.length, 1);
      });
    } finally {
      await rmi("docker", tag);
    }
  });
});

Deno.test("docker: --platform is passed to the build and lands in the config", async (t) => {
  await requireDocker();
  for (const [platform, arch] of [["linux/amd64", "amd64"], ["linux/arm64", "arm64"]]) {
    await t.step(`${platform} gives Architecture ${arch}`, async () => {
      const tag = `test/imgmkr-platform:${arch}`;
      try {
        await build(["--layer-sizes", "10KB", "--platform", platform, "--builder", "docker", tag]);
        const img = await inspect("docker", tag);
        assertEquals([img.Os, img.Architecture], ["linux", arch]);
      } finally {
        await rmi("docker", tag);
      }
    });
  }
});

/** True if a `docker build` of a context under `dir` is still running. */
async function buildRunning(dir: string): Promise<boolean> {
  return (await run(["pgrep", "-f", `docker build.*${dir}`])).code === 0;
}

/** IDs of untagged images. */
async function danglingImages(): Promise<string[]> {
  const r = await run(["docker", "images", "-q", "--no-trunc", "--filter", "dangling=true"]);
  return r.stdout.split("\n").filter(Boolean);
}

/** Bytes of image `id`. */
async function imageSize(id: string): Promise<number> {
  return Number((await run(["docker", "image", "inspect", "--format", "{{.Size}}", id])).stdout);
}

Deno.test("a signal stops imgmkr with 130/143, removes the temp dir, stops the builder, tags nothing", async (t) => {
  await requireDocker();
  // [name, signal, stderr text that triggers it, layer size, exit code, tag already on an image]
  const cases: [string, Deno.Signal, string, string, number, boolean][] = [
    ["SIGINT during generation", "SIGINT", "Generating", "3GB", 130, false],
    ["SIGINT at the build stage", "SIGINT", "Building", "600MB", 130, false],
    ["SIGTERM at the build stage", "SIGTERM", "Building", "600MB", 143, false],
    // docker's own output proves `docker build` is running when the signal lands.
    ["SIGINT while docker build runs", "SIGINT", "Sending build context", "600MB", 130, false],
    ["SIGTERM while docker build runs", "SIGTERM", "Sending build context", "600MB", 143, false],
    [
      "SIGTERM while rebuilding an existing tag keeps the previous image",
      "SIGTERM",
      "Sending build context",
      "600MB",
      143,
      true,
    ],
  ];
  let n = 0;
  for (const [name, signal, trigger, size, code, retag] of cases) {
    await t.step(name, async () => {
      const tag = `test/imgmkr-signal:case${++n}`;
      try {
        let previous: string | undefined;
        const danglingBefore = await danglingImages();
        if (retag) {
          await build(["--layer-sizes", "10KB", "--seed", "2", "--builder", "docker", tag]);
          previous = (await run(["docker", "image", "inspect", "--format", "{{.Id}}", tag]))
            .stdout.trim();
        }
        await withTempDir(async (tmp) => {
          const r = await runCli(
            ["--layer-sizes", size, "--seed", "1", "--builder", "docker", tag],
            { env: { TMPDIR: tmp }, signalAfter: { signal, when: (s) => s.includes(trigger) } },
          );
          assert(r.signalled, `the signal was sent: ${r.stderr}`);
          assertEquals(r.code, code, r.stderr);
          assertStringIncludes(r.stderr, `interrupted by ${signal}`);
          assert(!r.stderr.includes("Successfully tagged"), r.stderr);
          assertEquals(r.stdout, "");
          assertEquals(listDir(tmp), [], "temp dir removed");
          assert(!(await buildRunning(tmp)), "no docker build left running");
          // docker's legacy builder finishes an ADD whose client has gone, so the daemon
          // may still produce an image: wait for it (untagged) before checking the tag.
          const deadline = Date.now() + (trigger === "Sending build context" ? 15_000 : 1_500);
          let orphans: string[] = [];
          while (Date.now() < deadline && orphans.length === 0) {
            await new Promise((r) => setTimeout(r, 500));
            for (const id of await danglingImages()) {
              if (!danglingBefore.includes(id) && await imageSize(id) >= 600 * 1024 * 1024) {
                orphans.push(id);
              }
            }
          }
          const id = await run(["docker", "image", "inspect", "--format", "{{.Id}}", tag]);
          await run(["docker", "rmi", ...orphans]).catch(() => {});
          orphans = [];
          if (previous) assertEquals(id.stdout.trim(), previous, "the tag is unchanged");
          else assertNotEquals(id.code, 0, `${tag} is not tagged`);
        });
      } finally {
        await rmi("docker", tag);
      }
    });
  }
});

Deno.test("writeLayerFiles() on a full disk fails with 'No space left' and the fix", async () => {
  await withTmpfs("4m", async (dir) => {
    const plans = planLayers({ sizes: [8 * 1024 * 1024, 8 * 1024 * 1024], seed: 1 });
    const e = await assertRejects(
      () => writeLayerFiles({ plans, dir, seed: 1 }),
      Error,
      "No space left on device while writing",
    );
    assertStringIncludes(e.message, "--tmpdir-prefix");
  });
});

Deno.test("runBuild() removes the build dir when the disk fills up during generation", async () => {
  await withTmpfs("40m", async (dir) => {
    const lines: string[] = [];
    // Once the build dir exists (the "Generating" stage), fill the disk as another program would.
    const progress = new Progress({
      tty: false,
      write: (text) => {
        lines.push(text);
        if (!text.includes("Generating")) return;
        const f = Deno.openSync(`${dir}/filler`, { write: true, create: true });
        try {
          const chunk = new Uint8Array(1024 * 1024);
          for (;;) f.writeSync(chunk);
        } catch {
          // full
        } finally {
          f.close();
        }
      },
    });
    const e = await assertRejects(
      () =>
        runBuild({
          plans: planLayers({ sizes: [20 * 1024 * 1024], seed: 1 }),
          seed: 1,
          builder: "docker",
          tag: "test/imgmkr-enospc:v1",
          tmpdirPrefix: dir,
          progress,
        }),
      Error,
      "No space left on device",
    );
    assertMatch(e.message, /imgmkr-build-\w+\/layer1\/layer1\/20\.00MB-file/);
    assertEquals(listDir(dir), ["filler"], "only the filler is left");
    assert(lines.some((l) => l.includes("Cleaning up")), lines.join(""));
  });
});

Deno.test("podman: a signal during the build stops podman and tags nothing", async () => {
  const tag = "test/imgmkr-signal:podman";
  try {
    await withTempDir(async (tmp) => {
      const r = await runCli(
        ["--layer-sizes", "600MB", "--seed", "1", "--builder", "podman", tag],
        {
          env: { TMPDIR: tmp },
          // podman's own "STEP 2/2: ADD" line: the copy of 600 MB is under way.
          signalAfter: { signal: "SIGINT", when: (s) => s.includes("STEP 2/2") },
        },
      );
      assert(r.signalled, r.stderr);
      assertEquals(r.code, 130, r.stderr);
      assertEquals(listDir(tmp), []);
      assertNotEquals((await run(["pgrep", "-f", `podman build.*${tag}`])).code, 0);
      await new Promise((r) => setTimeout(r, 1500));
      assert(!(await exists("podman", tag)), `${tag} is not tagged`);
    });
  } finally {
    await rmi("podman", tag);
  }
});
