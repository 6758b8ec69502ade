import { assert, assertEquals, assertRejects, assertStringIncludes } from "./support/assert.ts";
import {
  CONTAINERD_NAME_ANNOTATION,
  createLoadSink,
  createOciArchiveSink,
  fileHeader,
} from "../lib/archive.ts";
import { BuilderError, UsageError } from "../lib/errors.ts";
import { dockerSocket } from "../lib/engine.ts";
import { REF_NAME_ANNOTATION, TEMP_PREFIX } from "../lib/layout.ts";
import { type ImageRecord, MediaType } from "../lib/oci.ts";
import { requireDocker, run } from "./support/docker.ts";
import {
  imageOf,
  listFiles,
  makeImage,
  makeRecord,
  mustRun,
  startContainerd,
  type TestImage,
  withTmpfs,
  writeImage,
  writeLayer,
} from "./support/oci.ts";

/** Size of the tmpfs that plays a full disk: too small for a 2 MB layer. */
const FULL_DISK_BYTES = 1024 * 1024;

const ARM64 = { os: "linux", architecture: "arm64" };
/** 8 GiB + 1: one byte past what the ustar octal size field holds. */
const BEYOND_USTAR = 8 * 1024 ** 3 + 1;

/** A repository name no other test uses, so parallel runs cannot collide. */
function uniqueName(what: string): string {
  return `imgmkr-test/${what}-${crypto.randomUUID().slice(0, 8)}`;
}

function diffIds(image: TestImage): string[] {
  return image.layers.map((l) => l.diffId);
}

async function entriesOf(tarFile: string): Promise<string[]> {
  return (await mustRun(["tar", "-tf", tarFile])).trim().split("\n");
}

async function extract(tarFile: string, name: string): Promise<string> {
  return await mustRun(["tar", "-xOf", tarFile, name]);
}

async function dirNames(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(dir)) names.push(e.name);
  return names.sort();
}

/** `<engine> image inspect` of `ref`, or undefined when there is no such image. */
async function engineInspect(engine: "docker" | "podman", ref: string) {
  const out = await run([engine, "image", "inspect", ref]);
  return out.code === 0 ? JSON.parse(out.stdout)[0] : undefined;
}

async function removeImage(engine: "docker" | "podman", ref: string): Promise<void> {
  await run([engine, "rmi", "--force", ref]);
}

/** Checks that `engine` has `ref` as exactly `image`: same image ID and diff IDs. */
async function assertLoaded(engine: "docker" | "podman", ref: string, image: TestImage) {
  const info = await engineInspect(engine, ref);
  assert(info !== undefined, `${engine} has no image ${ref}`);
  const id = engine === "docker" ? info.Id : `sha256:${info.Id}`;
  assertEquals(id, image.config.descriptor.digest);
  assertEquals(info.RootFS.Layers, diffIds(image));
  assertEquals(info.Architecture, image.platform.architecture);
}

Deno.test("createOciArchiveSink() writes a tar that skopeo, docker, podman and ctr accept", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-archive-test-" });
  const name = uniqueName("archive");
  const image = await makeImage({ dir: work, layers: [[1000, 300_000, 0], [70_000], [5000]] });
  const record = makeRecord([image], name, "v1");
  const archive = `${work}/out/image.tar`;
  await Deno.mkdir(`${work}/out`);
  try {
    // Concurrent layers: the first streams into the tar, the others are spooled and appended.
    await writeImage(await createOciArchiveSink({ file: archive }), record, { concurrent: true });

    await t.step("GNU tar lists the layout, docker files and each blob once", async () => {
      const blobs = [image.manifest, image.config, ...image.layers]
        .map((b) => `blobs/sha256/${b.descriptor.digest.slice(7)}`);
      const entries = await entriesOf(archive);
      assertEquals(
        [...entries].sort(),
        [
          "blobs/",
          "blobs/sha256/",
          ...blobs,
          "index.json",
          "manifest.json",
          "oci-layout",
          "repositories",
        ]
          .sort(),
      );
      assertEquals(await dirNames(`${work}/out`), ["image.tar"]);
    });

    await t.step("index.json names the tag and the containerd image name", async () => {
      const index = JSON.parse(await extract(archive, "index.json"));
      assertEquals(index.manifests, [{
        ...image.manifest.descriptor,
        annotations: {
          [REF_NAME_ANNOTATION]: "v1",
          [CONTAINERD_NAME_ANNOTATION]: `docker.io/${name}:v1`,
        },
      }]);
      const manifest = JSON.parse(await extract(archive, "manifest.json"));
      assertEquals(manifest, [{
        Config: `blobs/sha256/${image.config.descriptor.digest.slice(7)}`,
        RepoTags: [`docker.io/${name}:v1`],
        Layers: image.layers.map((l) => `blobs/sha256/${l.descriptor.digest.slice(7)}`),
      }]);
      assertEquals(JSON.parse(await extract(archive, "repositories")), {
        [`docker.io/${name}`]: { v1: image.config.descriptor.digest.slice(7) },
      });
    });

    await t.step("skopeo inspects it and copies it to a layout that umoci unpacks", async () => {
      const info = JSON.parse(await mustRun(["skopeo", "inspect", `oci-archive:${archive}:v1`]));
      assertEquals(info.Digest, image.manifest.descriptor.digest);
      assertEquals(info.Layers, image.layers.map((l) => l.descriptor.digest));
      const layout = `${work}/layout`;
      await mustRun(["skopeo", "copy", "--quiet", `oci-archive:${archive}:v1`, `oci:${layout}:v1`]);
      await mustRun(["umoci", "unpack", "--image", `${layout}:v1`, `${work}/bundle`]);
      const files = image.layers.flatMap((l) => l.files);
      assertEquals(
        await listFiles(`${work}/bundle/rootfs`),
        new Map(files.map((f) => [f.path, { size: f.size, sha256: f.sha256 }])),
      );
    });

    await t.step("docker load -i gives the image with our diff IDs", async () => {
      await requireDocker();
      try {
        const out = await mustRun(["docker", "load", "-i", archive]);
        assertStringIncludes(out, `Loaded image: ${name}:v1`);
        await assertLoaded("docker", `${name}:v1`, image);
      } finally {
        await removeImage("docker", `${name}:v1`);
      }
    });

    await t.step("podman load -i gives the image with our diff IDs", async () => {
      try {
        await mustRun(["podman", "load", "-i", archive]);
        await assertLoaded("podman", `docker.io/${name}:v1`, image);
      } finally {
        await removeImage("podman", `docker.io/${name}:v1`);
      }
    });

    await t.step("ctr images import names, stores and unpacks the image", async () => {
      const dir = await Deno.makeTempDir({ prefix: "imgmkr-ctd-" });
      const containerd = await startContainerd(dir);
      try {
        const ctr = ["ctr", "--address", containerd.address];
        await mustRun([...ctr, "images", "import", archive]);
        const list = await mustRun([...ctr, "images", "ls"]);
        const row = list.split("\n").find((l) => l.startsWith(`docker.io/${name}:v1 `));
        assert(row !== undefined, list);
        assertStringIncludes(row, image.manifest.descriptor.digest);
        const check = await mustRun([...ctr, "images", "check"]);
        assert(/complete \(4\/4\).*true/.test(check), check);
      } finally {
        await containerd.stop();
        await Deno.remove(dir, { recursive: true });
      }
    });
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("createOciArchiveSink() names one platform of a multi-platform record for docker", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-archive-test-" });
  try {
    const amd64 = await makeImage({ dir: work, layers: [[3000], [4000]] });
    const arm64 = await makeImage({ dir: work, layers: [[5000]], platform: ARM64 });
    const cases = [
      { want: amd64, options: {} },
      { want: arm64, options: { platform: ARM64 } },
    ];
    for (const { want, options } of cases) {
      await t.step(`docker load gets the ${want.platform.architecture} image`, async () => {
        await requireDocker();
        const name = uniqueName("multi");
        const record = makeRecord([amd64, arm64], name, "v1");
        const archive = `${work}/${want.platform.architecture}.tar`;
        await writeImage(await createOciArchiveSink({ file: archive, ...options }), record);
        const raw = JSON.parse(
          await mustRun(["skopeo", "inspect", "--raw", `oci-archive:${archive}:v1`]),
        );
        assertEquals(
          raw.manifests.map((m: { platform: { architecture: string } }) => m.platform.architecture),
          ["amd64", "arm64"],
        );
        assertEquals(JSON.parse(await extract(archive, "manifest.json")).length, 1);
        try {
          await mustRun(["docker", "load", "-i", archive]);
          await assertLoaded("docker", `${name}:v1`, want);
        } finally {
          await removeImage("docker", `${name}:v1`);
        }
      });
    }
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("createOciArchiveSink() stores a blob committed twice only once", async () => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-archive-test-" });
  try {
    const image = await makeImage({ dir: work, layers: [[20_000], [30_000]] });
    const archive = `${work}/image.tar`;
    const sink = await createOciArchiveSink({ file: archive });
    // Direct then direct, then two at once (direct and spooled), of the same digests.
    await writeLayer(sink, image.layers[0]);
    await writeLayer(sink, image.layers[0]);
    await Promise.all([writeLayer(sink, image.layers[1]), writeLayer(sink, image.layers[1])]);
    await writeLayer(sink, image.layers[0]);
    await writeImage(sink, makeRecord([image], "t/dup", "v1"));
    const entries = await entriesOf(archive);
    assertEquals(entries.length, new Set(entries).size, entries.join("\n"));
    const info = JSON.parse(await mustRun(["skopeo", "inspect", `oci-archive:${archive}:v1`]));
    assertEquals(info.Layers, image.layers.map((l) => l.descriptor.digest));
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("createOciArchiveSink() abort or a bad target leaves no partial tar", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-archive-test-" });
  try {
    const image = await makeImage({ dir: work, layers: [[200_000], [3000]] });
    const out = `${work}/out`;
    await Deno.mkdir(out);
    await Deno.writeTextFile(`${out}/old.tar`, "previous content");

    await t.step("abort with a direct and a spooled blob open", async () => {
      const sink = await createOciArchiveSink({ file: `${out}/old.tar` });
      await writeLayer(sink, image.layers[1]);
      const direct = await sink.createBlob({ mediaType: MediaType.LayerGzip });
      const spooled = await sink.createBlob({ mediaType: MediaType.LayerGzip });
      await direct.write(new Uint8Array(50_000));
      await spooled.write(new Uint8Array(50_000));
      const temps = (await dirNames(out)).filter((n) => n.startsWith(TEMP_PREFIX));
      assertEquals(temps.length, 2, "the temp tar and one spool file");
      await sink.abort();
      await sink.abort();
      assertEquals(await dirNames(out), ["old.tar"]);
      assertEquals(await Deno.readTextFile(`${out}/old.tar`), "previous content");
    });

    await t.step("a failed commit, then abort", async () => {
      const sink = await createOciArchiveSink({ file: `${out}/new.tar` });
      await writeLayer(sink, image.layers[1]);
      await assertRejects(
        () => sink.commit(makeRecord([image], "t/a", "v1")),
        Error,
        "never written",
      );
      await sink.abort();
      assertEquals(await dirNames(out), ["old.tar"]);
    });

    await t.step("a digest mismatch is a TypeError and the tar stays whole", async () => {
      const file = `${out}/mismatch.tar`;
      const sink = await createOciArchiveSink({ file });
      const writer = await sink.createBlob({ mediaType: MediaType.LayerGzip });
      await writer.write(new Uint8Array(10));
      await assertRejects(
        () => writer.commit(image.layers[0].descriptor),
        TypeError,
        "committed as",
      );
      await writeImage(sink, makeRecord([image], "t/a", "v1"));
      const info = JSON.parse(await mustRun(["skopeo", "inspect", `oci-archive:${file}:v1`]));
      assertEquals(info.Digest, image.manifest.descriptor.digest);
      await Deno.remove(file);
    });

    await t.step("a full disk fails naming the output and leaves the old file", async () => {
      const big = await makeImage({ dir: work, layers: [[2_000_000]] });
      await withTmpfs(FULL_DISK_BYTES, async (disk) => {
        await Deno.writeTextFile(`${disk}/image.tar`, "previous content");
        for (const concurrent of [false, true]) {
          const sink = await createOciArchiveSink({ file: `${disk}/image.tar` });
          // Two layers at once: one goes into the tar, the other to a spool file.
          const record = makeRecord(
            [imageOf(big.platform, [...big.layers, ...image.layers])],
            "t/a",
            "v1",
          );
          await assertRejects(
            () => writeImage(sink, record, { concurrent }),
            Error,
            `Cannot write oci-archive:${disk}/image.tar: No space left on device`,
          );
          assertEquals(await dirNames(disk), ["image.tar"]);
          assertEquals(await Deno.readTextFile(`${disk}/image.tar`), "previous content");
        }
      });
    });

    const bad = [
      { name: "a missing directory", file: `${work}/nope/x.tar`, message: "does not exist" },
      { name: "a directory", file: out, message: "is a directory" },
    ];
    for (const c of bad) {
      await t.step(`${c.name} as target gives a UsageError`, async () => {
        await assertRejects(() => createOciArchiveSink({ file: c.file }), UsageError, c.message);
      });
    }
    assertEquals(await dirNames(out), ["old.tar"]);
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("fileHeader() writes sizes of 8 GiB and more in base-256 that GNU tar reads", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-archive-test-" });
  try {
    for (const size of [0, 1, 511, 512, 0o77777777777, BEYOND_USTAR]) {
      await t.step(`size ${size}`, async () => {
        // A sparse file: the header, then `size` bytes of holes, padding and the end blocks.
        const path = `${work}/big.tar`;
        const name = `blobs/sha256/${"a".repeat(64)}`;
        await Deno.writeFile(path, fileHeader(name, size));
        const padded = Math.ceil(size / 512) * 512;
        await Deno.truncate(path, 512 + padded + 1024);
        const line = (await mustRun(["tar", "-tvf", path])).trim();
        assertStringIncludes(line, ` ${size} 1970-01-01 00:00 ${name}`);
        assertEquals(fileHeader(name, size).length, 512);
      });
    }
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("createLoadSink() streams a docker-archive that docker and podman load", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-load-test-" });
  try {
    const image = await makeImage({
      dir: work,
      layers: [[1000, 300_000], [70_000], [0]],
      compression: "none",
    });
    const loaders = [
      { engine: "docker", via: "docker load" },
      { engine: "docker", via: "the Engine API socket" },
      { engine: "podman", via: "podman load" },
    ] as const;
    for (const { engine, via } of loaders) {
      await t.step(`${engine} gets the image under repo:tag through ${via}`, async () => {
        if (engine === "docker") await requireDocker();
        const socket = via === "the Engine API socket" ? dockerSocket() : undefined;
        if (via === "the Engine API socket") assert(socket, "the test engine has no unix socket");
        const name = uniqueName("load");
        const ref = engine === "docker" ? `${name}:v1` : `docker.io/${name}:v1`;
        try {
          const sink = await createLoadSink({ command: [engine, "load"], socket });
          assertStringIncludes(sink.name, socket ?? `'${engine} load'`);
          // Concurrent layers must be serialized by the sink, not interleaved.
          await writeImage(sink, makeRecord([image], name, "v1"), {
            sizeKnown: true,
            concurrent: true,
          });
          await assertLoaded(engine, ref, image);
        } finally {
          await removeImage(engine, ref);
        }
      });
    }
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("createLoadSink() reports failures and never leaves a tagged partial image", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-load-test-" });
  try {
    const image = await makeImage({ dir: work, layers: [[200_000], [3000]], compression: "none" });
    const record = (name: string): ImageRecord => makeRecord([image], name, "v1");

    const failing = [
      { cmd: ["false"], includes: "exit code 1" },
      { cmd: ["sh", "-c", "echo cannot load this >&2; exit 3"], includes: "cannot load this" },
      {
        cmd: ["sh", "-c", "cat >/dev/null; echo late failure >&2; exit 4"],
        includes: "late failure",
      },
    ];
    for (const c of failing) {
      await t.step(`'${c.cmd.join(" ")}' gives a BuilderError with its output`, async () => {
        const sink = await createLoadSink({ command: c.cmd });
        await assertRejects(
          () => writeImage(sink, record("t/fail"), { sizeKnown: true }),
          BuilderError,
          c.includes,
        );
      });
    }

    for (const api of [false, true]) {
      const via = api ? "the Engine API" : "docker load";
      await t.step(`docker's own error for a corrupt stream is reported (${via})`, async () => {
        await requireDocker();
        const name = uniqueName("corrupt");
        // The config claims other diff IDs than the layers have: docker load must refuse it.
        const wrong = imageOf(image.platform, [
          { ...image.layers[0], diffId: image.layers[1].diffId },
          image.layers[1],
        ]);
        const socket = api ? dockerSocket() : undefined;
        const sink = await createLoadSink({ command: ["docker", "load"], socket });
        const err = await assertRejects(
          () => writeImage(sink, makeRecord([wrong], name, "v1"), { sizeKnown: true }),
          BuilderError,
        );
        assert(/diff ?id/i.test(err.message), err.message);
        if (api) assertStringIncludes(err.message, `the Docker Engine API at ${socket}`);
        assertEquals(await engineInspect("docker", `${name}:v1`), undefined);
      });

      await t.step(`abort mid-layer stops ${via} and tags nothing`, async () => {
        await requireDocker();
        const name = uniqueName("abort");
        const socket = api ? dockerSocket() : undefined;
        const sink = await createLoadSink({ command: ["docker", "load"], socket });
        await writeLayer(sink, image.layers[1], { sizeKnown: true });
        const writer = await sink.createBlob({ mediaType: MediaType.Layer, size: 200_000 });
        await writer.write(new Uint8Array(100_000));
        await sink.abort();
        await sink.abort();
        await assertRejects(() => sink.commit(record(name)), TypeError, "aborted");
        assertEquals(await engineInspect("docker", `${name}:v1`), undefined);
      });
    }

    await t.step("a socket nobody listens on is a BuilderError naming it", async () => {
      const socket = `${work}/no-daemon.sock`;
      const sink = await createLoadSink({ command: ["docker", "load"], socket });
      const err = await assertRejects(
        () => writeImage(sink, record("t/nosock"), { sizeKnown: true }),
        BuilderError,
        `Cannot stream into the Docker Engine API at ${socket}`,
      );
      assertStringIncludes(err.message, "No such file or directory");
    });

    await t.step("a blob without a size is a TypeError", async () => {
      const sink = await createLoadSink({ command: ["sh", "-c", "cat >/dev/null"] });
      await assertRejects(
        () => sink.createBlob({ mediaType: MediaType.Layer }),
        TypeError,
        "needs options.size",
      );
      await sink.abort();
    });

    await t.step("writing past the announced size is a RangeError", async () => {
      const sink = await createLoadSink({ command: ["sh", "-c", "cat >/dev/null"] });
      const writer = await sink.createBlob({ mediaType: MediaType.Layer, size: 10 });
      await assertRejects(() => writer.write(new Uint8Array(11)), RangeError, "announced as 10");
      await writer.abort();
    });

    await t.step("a command that is not on PATH is a BuilderError", async () => {
      await assertRejects(
        () => createLoadSink({ command: ["imgmkr-no-such-loader", "load"] }),
        BuilderError,
        "not on PATH",
      );
    });
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});
