/**
 * The native path end to end, as a user runs it: the real `main.ts` writes
 * `oci:`, `oci-archive:` and `load` outputs, and real consumers (skopeo,
 * umoci, docker, podman) read them back. The expected file bytes come from
 * the plan and the content generator; everything else comes from the tools.
 */

import { createHash } from "node:crypto";
import { fileSegments } from "../lib/content.ts";
import type { NativeSummary } from "../lib/image.ts";
import { planLayers } from "../lib/plan.ts";
import { parseSize } from "../lib/sizes.ts";
import {
  assert,
  assertEquals,
  assertMatch,
  assertNotEquals,
  assertStringIncludes,
} from "./support/assert.ts";
import { listDir, runCli, withTempDir, withTmpfs, writeScript } from "./support/cli.ts";
import { requireDocker, run } from "./support/docker.ts";
import { listFiles, mustRun } from "./support/oci.ts";

/** What `--json` prints for a native run. */
type Summary = Omit<NativeSummary, "printed">;

/** Runs imgmkr with `--json` and returns the parsed summary; fails on a non-zero exit. */
async function imgmkrJson(args: string[]): Promise<Summary> {
  const r = await runCli(["--json", "--quiet", ...args]);
  assertEquals(r.code, 0, `imgmkr ${args.join(" ")} failed: ${r.stderr}`);
  assertEquals(r.stderr, "", "--quiet prints nothing on success");
  return JSON.parse(r.stdout) as Summary;
}

/** Every file the plan puts in the image, with its size and SHA-256, by path. */
function expectedFiles(
  sizes: string[],
  seed: number,
  options: { mockFs?: boolean; targetFiles?: number } = {},
): Map<string, { size: number; sha256: string }> {
  const plans = planLayers({ sizes: sizes.map(parseSize), seed, ...options });
  const out = new Map<string, { size: number; sha256: string }>();
  for (const plan of plans) {
    for (const file of plan.files) {
      const hash = createHash("sha256");
      for (const seg of fileSegments(file.size, { seed, key: file.key })) hash.update(seg.bytes);
      out.set(file.path, { size: file.size, sha256: hash.digest("hex") });
    }
  }
  return out;
}

async function dockerDiffIds(tag: string): Promise<string[]> {
  const out = await mustRun(["docker", "image", "inspect", "--format", "{{json .RootFS}}", tag]);
  return JSON.parse(out).Layers;
}

Deno.test("--output oci: and oci-archive: agree digest for digest, and skopeo, umoci and docker load accept them", async (t) => {
  await requireDocker();
  const sizes = ["24MB", "1MB"];
  const args = ["--layer-sizes", sizes.join(","), "--mock-fs", "--seed", "3"];
  const tag = "imgmkr-test/native:1";
  await withTempDir(async (dir) => {
    const layout = `${dir}/layout`;
    const archive = `${dir}/image.tar`;
    const summary = await imgmkrJson([
      ...args,
      "--output",
      `oci:${layout}`,
      "--output",
      `oci-archive:${archive}`,
      tag,
    ]);

    await t.step("--json names the manifest, config and every layer", () => {
      assertEquals(summary.reference, tag);
      assertEquals(summary.seed, 3);
      assertEquals(summary.mediaType, "application/vnd.oci.image.manifest.v1+json");
      assertEquals(summary.layers.length, 2);
      const plans = planLayers({ sizes: sizes.map(parseSize), seed: 3, mockFs: true });
      for (const [i, l] of summary.layers.entries()) {
        assertEquals(l.mediaType, "application/vnd.oci.image.layer.v1.tar+gzip");
        assertEquals(l.fileBytes, parseSize(sizes[i]));
        assertEquals(l.fileCount, plans[i].files.length);
        // Random content: the gzip blob stays within 1% of the tar.
        assert(l.compressedSize < l.tarSize * 1.01, `layer ${i + 1}: ${JSON.stringify(l)}`);
      }
      assertNotEquals(summary.layers[0].digest, summary.layers[1].digest);
    });

    await t.step(
      "the layout's blobs hash to their names, and skopeo reads the same digests",
      async () => {
        for (const name of listDir(`${layout}/blobs/sha256`)) {
          const sum =
            (await mustRun(["sha256sum", `${layout}/blobs/sha256/${name}`])).split(" ")[0];
          assertEquals(sum, name, "blob content matches its name");
        }
        const info = JSON.parse(await mustRun(["skopeo", "inspect", `oci:${layout}:1`]));
        assertEquals(info.Digest, summary.digest);
        assertEquals(info.Layers, summary.layers.map((l) => l.digest));
        assertEquals([info.Os, info.Architecture], ["linux", "amd64"]);
        const fromArchive = JSON.parse(
          await mustRun(["skopeo", "inspect", `oci-archive:${archive}`]),
        );
        assertEquals(fromArchive.Digest, summary.digest, "oci-archive: has the same manifest");
        assertEquals(fromArchive.Layers, info.Layers);
      },
    );

    await t.step("umoci unpack gives every planned file with its size and sha256", async () => {
      const bundle = `${dir}/bundle`;
      await mustRun(["umoci", "unpack", "--image", `${layout}:1`, bundle]);
      const got = await listFiles(`${bundle}/rootfs`);
      assertEquals(got, expectedFiles(sizes, 3, { mockFs: true }));
    });

    await t.step("docker load -i the archive gives our diff IDs under the tag", async () => {
      try {
        const out = await mustRun(["docker", "load", "-i", archive]);
        assertStringIncludes(out, tag);
        assertEquals(await dockerDiffIds(tag), summary.layers.map((l) => l.diffId));
      } finally {
        await run(["docker", "rmi", "-f", tag]);
      }
    });

    await t.step(
      "the same seed gives byte-identical digests; another seed changes every layer",
      async () => {
        const again = await imgmkrJson([...args, "--output", `oci:${dir}/again`, tag]);
        assertEquals(again.digest, summary.digest);
        assertEquals(again.layers, summary.layers);
        const other = await imgmkrJson([
          ...args.slice(0, -1),
          "4",
          "--output",
          `oci:${dir}/other`,
          tag,
        ]);
        for (const [i, l] of other.layers.entries()) {
          assertNotEquals(l.digest, summary.layers[i].digest, `layer ${i + 1}`);
        }
      },
    );
  });
});

Deno.test("--output oci: into an existing layout adds a tag and keeps the other images", async () => {
  await withTempDir(async (dir) => {
    const layout = `${dir}/layout`;
    const a = await imgmkrJson([
      "--layer-sizes",
      "1MB",
      "--seed",
      "1",
      "--output",
      `oci:${layout}`,
      "t/n:a",
    ]);
    const b = await imgmkrJson([
      "--layer-sizes",
      "2MB",
      "--seed",
      "2",
      "--output",
      `oci:${layout}`,
      "t/n:b",
    ]);
    for (const [tag, s] of [["a", a], ["b", b]] as const) {
      const info = JSON.parse(await mustRun(["skopeo", "inspect", `oci:${layout}:${tag}`]));
      assertEquals(info.Digest, s.digest, `tag ${tag}`);
    }
  });
});

Deno.test("--output load streams the image into docker and podman with no temp data", async (t) => {
  await requireDocker();
  const cases = [
    // docker's daemon takes the stream on its API socket (DOCKER_HOST here is a unix socket).
    {
      name: "docker, through the Engine API",
      engine: "docker",
      finch: false,
      via: "Engine API at",
    },
    { name: "podman, through 'podman load'", engine: "podman", finch: false, via: "'podman load'" },
    // finch is not installable here: a stand-in on PATH logs its arguments and forwards to docker.
    {
      name: "finch first, through 'finch load'",
      engine: "docker",
      finch: true,
      via: "'finch load'",
    },
  ];
  for (const c of cases) {
    await t.step(c.name, async () => {
      const tag = `imgmkr-test/load-${c.finch ? "finch" : c.engine}:1`;
      const engine = c.engine;
      try {
        await withTempDir(async (tmp) => {
          const bin = `${tmp}/bin`;
          const env: Record<string, string> = { TMPDIR: `${tmp}/tmp` };
          await Deno.mkdir(env.TMPDIR);
          if (c.finch) {
            await Deno.mkdir(bin);
            writeScript(bin, "finch", `echo "$*" >> '${tmp}/finch.log'\nexec docker "$@"`);
            env.PATH = `${bin}:${Deno.env.get("PATH")}`;
          }
          const r = await runCli(
            [
              "--layer-sizes",
              "8MB,10KB",
              "--seed",
              "5",
              "--output",
              "load",
              ...(c.finch ? [] : ["--builder", engine]),
              "--json",
              tag,
            ],
            { env },
          );
          assertEquals(r.code, 0, r.stderr);
          assertStringIncludes(r.stderr, c.via);
          if (c.finch) {
            assertEquals(Deno.readTextFileSync(`${tmp}/finch.log`).trim().split("\n"), [
              "info",
              "load",
            ]);
          }
          const summary = JSON.parse(r.stdout) as Summary;
          assertEquals(listDir(env.TMPDIR), [], "nothing written to the temp dir");
          // Engines store layers uncompressed: a load-only run makes plain tars.
          for (const l of summary.layers) {
            assertEquals(l.mediaType, "application/vnd.oci.image.layer.v1.tar");
          }
          const name = engine === "podman" ? `docker.io/${tag}` : tag;
          const out = await mustRun([
            engine,
            "image",
            "inspect",
            "--format",
            "{{json .RootFS.Layers}}|{{.Os}}/{{.Architecture}}",
            name,
          ]);
          const [layers, platform] = out.trim().split("|");
          assertEquals(JSON.parse(layers), summary.layers.map((l) => l.diffId));
          assertEquals(platform, "linux/amd64");
        });
      } finally {
        await run([engine, "rmi", "-f", tag]);
      }
    });
  }
});

Deno.test("--output load next to a gzip oci: output loads the same layers, from a second plain pass", async () => {
  await requireDocker();
  const tag = "imgmkr-test/load-and-oci:1";
  try {
    await withTempDir(async (dir) => {
      // The plain second pass for docker is not hashed at all (it carries the first pass's
      // diffIDs, which docker checks every layer against); 70 MB takes the Worker-generated path.
      const summary = await imgmkrJson([
        "--layer-sizes",
        "70MB,2MB",
        "--seed",
        "13",
        "--entropy",
        "60",
        "--output",
        `oci:${dir}/l`,
        "--output",
        "load",
        "--builder",
        "docker",
        tag,
      ]);
      for (const l of summary.layers) {
        assertEquals(l.mediaType, "application/vnd.oci.image.layer.v1.tar+gzip");
      }
      const out = await mustRun([
        "docker",
        "image",
        "inspect",
        "--format",
        "{{json .RootFS.Layers}}",
        tag,
      ]);
      assertEquals(JSON.parse(out), summary.layers.map((l) => l.diffId));
    });
  } finally {
    await run(["docker", "rmi", "-f", tag]);
  }
});

Deno.test("--platform with several values writes an index that skopeo shows with both platforms", async (t) => {
  await withTempDir(async (dir) => {
    const base = [
      "--layer-sizes",
      "1MB,2MB",
      "--seed",
      "8",
      "--platform",
      "linux/amd64,linux/arm64",
    ];
    const s = await imgmkrJson([...base, "--output", `oci:${dir}/multi`, "t/multi:1"]);
    await t.step("the root is an index of one manifest per platform", async () => {
      assertEquals(s.mediaType, "application/vnd.oci.image.index.v1+json");
      const raw = JSON.parse(await mustRun(["skopeo", "inspect", "--raw", `oci:${dir}/multi:1`]));
      assertEquals(raw.mediaType, "application/vnd.oci.image.index.v1+json");
      assertEquals(
        raw.manifests.map((m: { platform: { os: string; architecture: string } }) =>
          `${m.platform.os}/${m.platform.architecture}`
        ),
        ["linux/amd64", "linux/arm64"],
      );
      assertEquals(
        raw.manifests.map((m: { digest: string }) => m.digest),
        s.manifests.map((m) => m.digest),
      );
      for (const arch of ["amd64", "arm64"]) {
        const info = JSON.parse(
          await mustRun(["skopeo", "--override-arch", arch, "inspect", `oci:${dir}/multi:1`]),
        );
        assertEquals(info.Architecture, arch);
        assertEquals(
          info.Layers,
          s.layers.filter((l) => l.platform === `linux/${arch}`).map((l) => l.digest),
        );
      }
    });
    await t.step("each platform has its own layers, unless --share-layers", async () => {
      const digests = s.layers.map((l) => l.digest);
      assertEquals(new Set(digests).size, 4);
      const shared = await imgmkrJson([
        ...base,
        "--share-layers",
        "--output",
        `oci:${dir}/shared`,
        "t/multi:1",
      ]);
      const amd = shared.layers.filter((l) => l.platform === "linux/amd64").map((l) => l.digest);
      const arm = shared.layers.filter((l) => l.platform === "linux/arm64").map((l) => l.digest);
      assertEquals(amd, arm);
      assertNotEquals(
        shared.manifests[0].config,
        shared.manifests[1].config,
        "configs differ by platform",
      );
    });
  });
});

Deno.test("--compression sets the layer media type and the blob decompresses to the diffID", async (t) => {
  const cases = [
    ["none", "application/vnd.oci.image.layer.v1.tar", ["cat"]],
    ["gzip", "application/vnd.oci.image.layer.v1.tar+gzip", ["gzip", "-dc"]],
    ["zstd", "application/vnd.oci.image.layer.v1.tar+zstd", ["zstd", "-dc"]],
  ] as const;
  for (const [compression, mediaType, decompress] of cases) {
    await t.step(compression, async () => {
      await withTempDir(async (dir) => {
        const s = await imgmkrJson([
          "--layer-sizes",
          "3MB",
          "--entropy",
          "50",
          "--compression",
          compression,
          "--output",
          `oci:${dir}/l`,
          "t/c:1",
        ]);
        const layer = s.layers[0];
        assertEquals(layer.mediaType, mediaType);
        const blob = `${dir}/l/blobs/sha256/${layer.digest.slice(7)}`;
        const out = await mustRun([
          "sh",
          "-c",
          `${decompress.join(" ")} < '${blob}' | sha256sum`,
        ]);
        assertEquals(`sha256:${out.split(" ")[0]}`, layer.diffId);
        if (compression !== "none") {
          assert(
            layer.compressedSize < layer.tarSize * 0.6,
            `compressed: ${JSON.stringify(layer)}`,
          );
        }
      });
    });
  }
});

Deno.test("--entropy sets how well layers compress", async (t) => {
  // Bounds from measured ratios (see the README's table), with room for noise-free drift.
  const cases: [number, number, number][] = [
    [0, 0, 0.02],
    [25, 0.2, 0.32],
    [50, 0.45, 0.57],
    [75, 0.7, 0.8],
    [100, 0.99, 1.01],
  ];
  await withTempDir(async (dir) => {
    for (const [entropy, lo, hi] of cases) {
      await t.step(`entropy ${entropy}: gzip ratio between ${lo} and ${hi}`, async () => {
        const s = await imgmkrJson([
          "--layer-sizes",
          "16MB",
          "--entropy",
          String(entropy),
          "--output",
          `oci:${dir}/e${entropy}`,
          "t/e:1",
        ]);
        const ratio = s.layers[0].compressedSize / s.layers[0].tarSize;
        assert(ratio >= lo && ratio <= hi, `ratio ${ratio.toFixed(4)}`);
      });
    }
  });
});

Deno.test("a failed or interrupted native run leaves no partial blob, index.json or archive", async (t) => {
  await t.step("SIGINT while writing oci: and oci-archive:", async () => {
    await withTempDir(async (dir) => {
      const r = await runCli(
        [
          "--layer-sizes",
          "2GB",
          "--seed",
          "1",
          "--output",
          `oci:${dir}/layout`,
          "--output",
          `oci-archive:${dir}/image.tar`,
          "t/n:1",
        ],
        { signalAfter: { signal: "SIGINT", when: (s) => s.includes("Building") } },
      );
      assert(r.signalled);
      assertEquals(r.code, 130, r.stderr);
      assertEquals(r.stdout, "");
      assertEquals(listDir(dir), [], "the new layout and the archive's temp file are gone");
    });
  });
  await t.step("SIGTERM while writing into an existing layout keeps it as it was", async () => {
    await withTempDir(async (dir) => {
      const layout = `${dir}/layout`;
      await imgmkrJson(["--layer-sizes", "1MB", "--output", `oci:${layout}`, "t/n:old"]);
      const before = await Deno.readTextFile(`${layout}/index.json`);
      const blobs = listDir(`${layout}/blobs/sha256`);
      const r = await runCli(
        ["--layer-sizes", "2GB", "--output", `oci:${layout}`, "t/n:new"],
        { signalAfter: { signal: "SIGTERM", when: (s) => s.includes("Building") } },
      );
      assertEquals(r.code, 143, r.stderr);
      assertEquals(await Deno.readTextFile(`${layout}/index.json`), before);
      assertEquals(listDir(`${layout}/blobs/sha256`), blobs, "no partial or temp blob");
      assertEquals(listDir(layout), ["blobs", "index.json", "oci-layout"]);
    });
  });
  await t.step("a full disk fails with exit 1 naming the output, and leaves nothing", async () => {
    await withTmpfs("8m", async (dir) => {
      const r = await runCli([
        "--layer-sizes",
        "20MB",
        "--output",
        `oci:${dir}/layout`,
        "--output",
        `oci-archive:${dir}/image.tar`,
        "t/n:1",
      ]);
      assertEquals(r.code, 1, r.stderr);
      assertMatch(r.stderr, /imgmkr: error: Cannot write oci(-archive)?:.*No space left on device/);
      assertEquals(listDir(dir), []);
    });
  });
});

Deno.test("--dry-run with a native output prints the plan and writes nothing", async () => {
  await withTempDir(async (dir) => {
    const r = await runCli([
      "--layer-sizes",
      "1MB,2KB",
      "--mock-fs",
      "--dry-run",
      "--compression",
      "zstd",
      "--output",
      `oci:${dir}/layout`,
      "t/n:1",
    ]);
    assertEquals(r.code, 0, r.stderr);
    assertStringIncludes(r.stdout, "application/vnd.oci.image.layer.v1.tar+zstd");
    assertStringIncludes(r.stdout, "layer 2: 2.00KB (2048 bytes)");
    assertEquals(listDir(dir), []);
  });
});
