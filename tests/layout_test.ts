import { assert, assertEquals, assertRejects } from "./support/assert.ts";
import { UsageError } from "../lib/errors.ts";
import { createLayoutSink, REF_NAME_ANNOTATION, TEMP_PREFIX } from "../lib/layout.ts";
import { MediaType } from "../lib/oci.ts";
import { run } from "./support/docker.ts";
import {
  listFiles,
  makeImage,
  makeRecord,
  mustRun,
  type TestImage,
  withTmpfs,
  writeImage,
  writeLayer,
} from "./support/oci.ts";

/** Size of the tmpfs that plays a full disk: room for a small image, not for a 2 MB layer. */
const FULL_DISK_BYTES = 1024 * 1024;

const ARM64 = { os: "linux", architecture: "arm64" };

async function skopeoInspect(ref: string, ...flags: string[]) {
  return JSON.parse(await mustRun(["skopeo", "inspect", ...flags, ref]));
}

async function readIndex(dir: string) {
  return JSON.parse(await Deno.readTextFile(`${dir}/index.json`));
}

/** Names in `dir/blobs/sha256`, sorted. */
async function blobNames(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(`${dir}/blobs/sha256`)) names.push(e.name);
  return names.sort();
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch {
    return false;
  }
}

function layerDigests(image: TestImage): string[] {
  return image.layers.map((l) => l.descriptor.digest);
}

Deno.test("createLayoutSink() writes a layout that skopeo and umoci read", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-layout-test-" });
  try {
    const image = await makeImage({ dir: work, layers: [[1000, 300_000, 0], [70_000]] });
    const layout = `${work}/layout`;
    await writeImage(await createLayoutSink({ dir: layout }), makeRecord([image], "t/l", "v1"));

    await t.step("oci-layout, index.json and blobs follow the image spec", async () => {
      assertEquals(
        await Deno.readTextFile(`${layout}/oci-layout`),
        '{"imageLayoutVersion":"1.0.0"}',
      );
      const index = await readIndex(layout);
      assertEquals(index.schemaVersion, 2);
      assertEquals(index.mediaType, MediaType.Index);
      assertEquals(index.manifests, [{
        ...image.manifest.descriptor,
        annotations: { [REF_NAME_ANNOTATION]: "v1" },
      }]);
      const expected = [image.manifest, image.config, ...image.layers]
        .map((b) => b.descriptor.digest.slice("sha256:".length)).sort();
      assertEquals(await blobNames(layout), expected);
      const names: string[] = [];
      for await (const e of Deno.readDir(layout)) names.push(e.name);
      assertEquals(names.sort(), ["blobs", "index.json", "oci-layout"]);
    });

    await t.step("skopeo inspect reads the manifest digest, layers and platform", async () => {
      const info = await skopeoInspect(`oci:${layout}:v1`);
      assertEquals(info.Digest, image.manifest.descriptor.digest);
      assertEquals(info.Layers, layerDigests(image));
      assertEquals([info.Os, info.Architecture], ["linux", "amd64"]);
    });

    await t.step("skopeo copy to another layout keeps every digest", async () => {
      const other = `${work}/copy`;
      await mustRun(["skopeo", "copy", "--quiet", `oci:${layout}:v1`, `oci:${other}:v1`]);
      const info = await skopeoInspect(`oci:${other}:v1`);
      assertEquals(info.Digest, image.manifest.descriptor.digest);
      assertEquals(await blobNames(other), await blobNames(layout));
    });

    await t.step("umoci unpack gives every file with its size and sha256", async () => {
      const bundle = `${work}/bundle`;
      await mustRun(["umoci", "unpack", "--image", `${layout}:v1`, bundle]);
      const found = await listFiles(`${bundle}/rootfs`);
      const want = new Map(
        image.layers.flatMap((l) => l.files).map((
          f,
        ) => [f.path, { size: f.size, sha256: f.sha256 }]),
      );
      assertEquals(found, want);
    });
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("createLayoutSink() adds tags to an existing layout and replaces the same tag", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-layout-test-" });
  try {
    const layout = `${work}/layout`;
    const [a, b, c] = [
      await makeImage({ dir: work, layers: [[5000]] }),
      await makeImage({ dir: work, layers: [[6000], [7000]] }),
      await makeImage({ dir: work, layers: [[8000]] }),
    ];
    await writeImage(await createLayoutSink({ dir: layout }), makeRecord([a], "t/l", "a"));
    await writeImage(await createLayoutSink({ dir: layout }), makeRecord([b], "t/l", "b"));

    await t.step("a second tag keeps the first: skopeo inspects both", async () => {
      assertEquals((await skopeoInspect(`oci:${layout}:a`)).Digest, a.manifest.descriptor.digest);
      assertEquals((await skopeoInspect(`oci:${layout}:b`)).Digest, b.manifest.descriptor.digest);
      assertEquals((await readIndex(layout)).manifests.length, 2);
    });

    await t.step("the same tag is replaced in place, and other tags stay", async () => {
      await writeImage(await createLayoutSink({ dir: layout }), makeRecord([c], "t/l", "a"));
      const index = await readIndex(layout);
      assertEquals(
        index.manifests.map((m: { digest: string; annotations: Record<string, string> }) => [
          m.annotations[REF_NAME_ANNOTATION],
          m.digest,
        ]),
        [["a", c.manifest.descriptor.digest], ["b", b.manifest.descriptor.digest]],
      );
      const info = await skopeoInspect(`oci:${layout}:a`);
      assertEquals(info.Layers, layerDigests(c));
    });

    await t.step("an existing blob is kept, not rewritten, and has() reports it", async () => {
      const layer = b.layers[0];
      const path = `${layout}/blobs/sha256/${layer.descriptor.digest.slice(7)}`;
      const before = await Deno.stat(path);
      const sink = await createLayoutSink({ dir: layout });
      assert(await sink.has(layer.descriptor));
      assert(!(await sink.has({ ...layer.descriptor, size: layer.descriptor.size + 1 })));
      await writeLayer(sink, layer);
      assertEquals((await Deno.stat(path)).ino, before.ino);
      assert(!(await blobNames(layout)).some((n) => n.startsWith(TEMP_PREFIX)));
      await sink.abort();
      assertEquals((await Deno.stat(path)).ino, before.ino);
    });
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("createLayoutSink() refuses a directory that is not an OCI layout", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-layout-test-" });
  try {
    const cases: { name: string; setup: (dir: string) => Promise<void>; message: RegExp }[] = [
      {
        name: "a non-empty directory without oci-layout",
        setup: (dir) => Deno.mkdir(dir).then(() => Deno.writeTextFile(`${dir}/notes.txt`, "x")),
        message: /is not empty and has no oci-layout file/,
      },
      {
        name: "a regular file",
        setup: (dir) => Deno.writeTextFile(dir, "x"),
        message: /exists and is not a directory/,
      },
      {
        name: "an unknown layout version",
        setup: (dir) =>
          Deno.mkdir(dir).then(() =>
            Deno.writeTextFile(`${dir}/oci-layout`, '{"imageLayoutVersion":"9.0.0"}')
          ),
        message: /imageLayoutVersion "9\.0\.0", not "1\.0\.0"/,
      },
      {
        name: "an index.json that is not JSON",
        setup: async (dir) => {
          await Deno.mkdir(dir);
          await Deno.writeTextFile(`${dir}/oci-layout`, '{"imageLayoutVersion":"1.0.0"}');
          await Deno.writeTextFile(`${dir}/index.json`, "{nope");
        },
        message: /index\.json is not valid JSON/,
      },
    ];
    for (const [i, c] of cases.entries()) {
      await t.step(`${c.name} gives a UsageError`, async () => {
        const dir = `${work}/case-${i}`;
        await c.setup(dir);
        const err = await assertRejects(() => createLayoutSink({ dir }), UsageError);
        assert(c.message.test(err.message), err.message);
        assert(err.message.startsWith(`Cannot write oci:${dir}: `), err.message);
      });
    }

    await t.step("an existing empty directory becomes a layout", async () => {
      const dir = `${work}/empty`;
      await Deno.mkdir(dir);
      const image = await makeImage({ dir: work, layers: [[100]] });
      await writeImage(await createLayoutSink({ dir }), makeRecord([image], "t/l", "v1"));
      assertEquals((await skopeoInspect(`oci:${dir}:v1`)).Digest, image.manifest.descriptor.digest);
    });
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("createLayoutSink() abort leaves no temp files and no index.json change", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-layout-test-" });
  try {
    const layout = `${work}/layout`;
    const first = await makeImage({ dir: work, layers: [[4000]] });
    const next = await makeImage({ dir: work, layers: [[200_000], [3000]] });
    await writeImage(await createLayoutSink({ dir: layout }), makeRecord([first], "t/l", "v1"));
    const indexBefore = await Deno.readTextFile(`${layout}/index.json`);
    const blobsBefore = await blobNames(layout);

    await t.step("abort mid-blob in an existing layout", async () => {
      const sink = await createLayoutSink({ dir: layout });
      await writeLayer(sink, next.layers[1]); // one complete blob
      const writer = await sink.createBlob({ mediaType: MediaType.LayerGzip });
      await writer.write(new Uint8Array(100_000));
      assert((await blobNames(layout)).some((n) => n.startsWith(TEMP_PREFIX)));
      await sink.abort();
      await sink.abort(); // twice is fine
      const after = await blobNames(layout);
      assert(!after.some((n) => n.startsWith(TEMP_PREFIX)), after.join(" "));
      assertEquals(await Deno.readTextFile(`${layout}/index.json`), indexBefore);
      assertEquals(
        (await skopeoInspect(`oci:${layout}:v1`)).Digest,
        first.manifest.descriptor.digest,
      );
    });

    await t.step("a digest mismatch on commit is a TypeError and names no blob", async () => {
      const sink = await createLayoutSink({ dir: layout });
      const writer = await sink.createBlob({ mediaType: MediaType.LayerGzip });
      await writer.write(new Uint8Array(10));
      const wrong = next.layers[0].descriptor;
      const err = await assertRejects(() => writer.commit(wrong), TypeError);
      assert(err.message.includes(`committed as ${wrong.digest}`), err.message);
      await sink.abort();
      const after = await blobNames(layout);
      assert(!after.includes(wrong.digest.slice(7)));
      assert(!after.some((n) => n.startsWith(TEMP_PREFIX)));
    });

    await t.step("abort removes a layout directory the sink created", async () => {
      const dir = `${work}/new/nested/layout`;
      const sink = await createLayoutSink({ dir });
      await writeLayer(sink, next.layers[1]);
      await sink.abort();
      assert(!(await exists(`${work}/new`)));
    });

    await t.step("abort turns an empty directory it initialized back to empty", async () => {
      const dir = `${work}/was-empty`;
      await Deno.mkdir(dir);
      const sink = await createLayoutSink({ dir });
      await writeLayer(sink, next.layers[1]);
      await sink.abort();
      const left: string[] = [];
      for await (const e of Deno.readDir(dir)) left.push(e.name);
      assertEquals(left, []);
    });

    await t.step("a failed commit (missing layer) leaves index.json as it was", async () => {
      const sink = await createLayoutSink({ dir: layout });
      await writeLayer(sink, next.layers[1]);
      const err = await assertRejects(() => sink.commit(makeRecord([next], "t/l", "v1")), Error);
      assert(err.message.includes(`layer ${next.layers[0].descriptor.digest}`), err.message);
      await sink.abort();
      assertEquals(await Deno.readTextFile(`${layout}/index.json`), indexBefore);
      const after = await blobNames(layout);
      assert(!after.some((n) => n.startsWith(TEMP_PREFIX)));
      assert(blobsBefore.every((n) => after.includes(n)));
    });
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("createLayoutSink() writes a multi-platform index that skopeo reads", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-layout-test-" });
  try {
    const amd64 = await makeImage({ dir: work, layers: [[3000], [4000]] });
    const arm64 = await makeImage({ dir: work, layers: [[5000]], platform: ARM64 });
    const record = makeRecord([amd64, arm64], "t/multi", "v1");
    const layout = `${work}/layout`;
    await writeImage(await createLayoutSink({ dir: layout }), record, { concurrent: true });

    await t.step("skopeo inspect --raw shows the index with both platforms", async () => {
      const raw = await skopeoInspect(`oci:${layout}:v1`, "--raw");
      assertEquals(raw.mediaType, MediaType.Index);
      assertEquals(
        raw.manifests.map((m: { digest: string; platform: unknown }) => [m.digest, m.platform]),
        [
          [amd64.manifest.descriptor.digest, { os: "linux", architecture: "amd64" }],
          [arm64.manifest.descriptor.digest, ARM64],
        ],
      );
      assertEquals((await readIndex(layout)).manifests[0].digest, record.root.descriptor.digest);
    });

    for (const [arch, image] of [["amd64", amd64], ["arm64", arm64]] as const) {
      await t.step(`skopeo resolves the ${arch} image from the index`, async () => {
        const info = await skopeoInspect(`oci:${layout}:v1`, "--override-arch", arch);
        // skopeo reports the digest of what the tag names (the index) and the chosen image's layers.
        assertEquals(info.Digest, record.root.descriptor.digest);
        assertEquals(info.Architecture, arch);
        assertEquals(info.Layers, layerDigests(image));
      });
    }

    await t.step("skopeo copy --all copies both platforms", async () => {
      const other = `${work}/copy`;
      const out = await run([
        "skopeo",
        "copy",
        "--all",
        "--quiet",
        `oci:${layout}:v1`,
        `oci:${other}:v1`,
      ]);
      assertEquals(out.code, 0, out.stderr);
      assertEquals(await blobNames(other), await blobNames(layout));
    });
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});

Deno.test("createLayoutSink() on a full disk fails naming the output and cleans up", async (t) => {
  const work = await Deno.makeTempDir({ prefix: "imgmkr-layout-test-" });
  try {
    const small = await makeImage({ dir: work, layers: [[10_000]] });
    const big = await makeImage({ dir: work, layers: [[2_000_000]] });
    await withTmpfs(FULL_DISK_BYTES, async (disk) => {
      await t.step("a new layout is removed again", async () => {
        const dir = `${disk}/new`;
        const sink = await createLayoutSink({ dir });
        await assertRejects(
          () => writeImage(sink, makeRecord([big], "t/l", "v1")),
          Error,
          `Cannot write oci:${dir}: No space left on device`,
        );
        assertEquals(await Array.fromAsync(Deno.readDir(disk)), []);
      });

      await t.step("an existing layout keeps its index.json and gets no temp files", async () => {
        const dir = `${disk}/layout`;
        await writeImage(await createLayoutSink({ dir }), makeRecord([small], "t/l", "v1"));
        const indexBefore = await Deno.readTextFile(`${dir}/index.json`);
        const blobsBefore = await blobNames(dir);
        const sink = await createLayoutSink({ dir });
        await assertRejects(
          () => writeImage(sink, makeRecord([big], "t/l", "v2")),
          Error,
          "No space left on device",
        );
        assertEquals(await Deno.readTextFile(`${dir}/index.json`), indexBefore);
        assertEquals(await blobNames(dir), blobsBefore);
        const info = await skopeoInspect(`oci:${dir}:v1`);
        assertEquals(info.Digest, small.manifest.descriptor.digest);
      });
    });
  } finally {
    await Deno.remove(work, { recursive: true });
  }
});
