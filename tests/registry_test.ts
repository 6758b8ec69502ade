import {
  BlobMismatchError,
  createRegistrySink,
  isLoopbackHost,
  isRetryableBlobError,
  parseRetryAfter,
  pushBlobWithRetry,
  type RegistrySink,
  type RegistrySinkOptions,
  RETRY_MAX_MS,
  retryDelay,
} from "../lib/registry.ts";
import { RegistryError } from "../lib/errors.ts";
import type { NativeSummary } from "../lib/image.ts";
import { parseReference } from "../lib/reference.ts";
import { jsonBlob, MediaType, sha256Digest } from "../lib/oci.ts";
import { requireDocker, run } from "./support/docker.ts";
import { runCli, withTempDir } from "./support/cli.ts";
import { listFiles } from "./support/oci.ts";
import {
  assert,
  assertEquals,
  assertRejects,
  type Fault,
  mustRun,
  type ProxyRequest,
  randomBytes,
  type RegistryServer,
  startFaultProxy,
  startRegistry,
  type SyntheticImage,
  syntheticImage,
} from "./support/registry.ts";

/** Slices layers are written in, like the real pipeline's segments. */
const WRITE_SLICE = 1024 * 1024;
/** Backoff for tests: real code paths, millisecond waits. */
const FAST = { retryBaseMs: 1, retryMaxMs: 5 };

function sink(host: string, extra: Partial<RegistrySinkOptions> = {}): RegistrySink {
  return createRegistrySink({ reference: parseReference(`${host}/t/n:1`), ...FAST, ...extra });
}

/** Pushes a synthetic image (layers concurrently); returns how often each layer was produced. */
async function pushImage(s: RegistrySink, image: SyntheticImage): Promise<number[]> {
  const produced = image.layers.map(() => 0);
  try {
    await Promise.all(image.layers.map((layer, i) =>
      pushBlobWithRetry(s, async (w) => {
        produced[i]++;
        for (let off = 0; off < layer.bytes.length; off += WRITE_SLICE) {
          await w.write(layer.bytes.subarray(off, off + WRITE_SLICE));
        }
        return layer.descriptor;
      }, { mediaType: layer.descriptor.mediaType })
    ));
    await s.putBlob(image.config);
    await s.commit(image.record);
  } catch (err) {
    await s.abort();
    throw err;
  }
  return produced;
}

async function skopeo(...args: string[]): Promise<string> {
  return await mustRun(["skopeo", ...args]);
}

/** Checks with skopeo that the registry serves exactly `image` under `ref`. */
async function assertServes(host: string, image: SyntheticImage, tag = "1"): Promise<void> {
  const ref = `docker://${host}/t/n:${tag}`;
  const raw = await skopeo("inspect", "--tls-verify=false", "--raw", ref);
  assertEquals(raw, new TextDecoder().decode(image.manifest.bytes));
  const info = JSON.parse(await skopeo("inspect", "--tls-verify=false", ref));
  assertEquals(info.Digest, image.manifest.descriptor.digest);
  assertEquals(info.Layers, image.layers.map((l) => l.descriptor.digest));
  // Pull every blob with a real client and hash the files it wrote.
  const dir = await Deno.makeTempDir({ prefix: "imgmkr-skopeo-" });
  try {
    // Keep uncompressed test layers as they are: skopeo would gzip them for an oci: target.
    await skopeo(
      "copy",
      "--src-tls-verify=false",
      "--dest-oci-accept-uncompressed-layers",
      ref,
      `oci:${dir}:x`,
    );
    for (const blob of [...image.layers.map((l) => l.descriptor), image.config.descriptor]) {
      const hex = blob.digest.slice("sha256:".length);
      const out = await mustRun(["sha256sum", `${dir}/blobs/sha256/${hex}`]);
      assertEquals(out.split(" ")[0], hex);
      assertEquals((await Deno.stat(`${dir}/blobs/sha256/${hex}`)).size, blob.size);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function withRegistry(fn: (r: RegistryServer) => Promise<void>): Promise<void> {
  const registry = await startRegistry();
  try {
    await fn(registry);
  } catch (err) {
    throw new Error(`${(err as Error).message}\nregistry log:\n${registry.logs()}`, { cause: err });
  } finally {
    await registry.stop();
  }
}

Deno.test("retry helpers: capped backoff, Retry-After, loopback hosts", async (t) => {
  await t.step("retryDelay() grows exponentially and never exceeds its cap", () => {
    for (let attempt = 0; attempt < 20; attempt++) {
      const d = retryDelay(attempt, { baseMs: 100, maxMs: 1000 });
      const full = Math.min(1000, 100 * 2 ** attempt);
      assert(d >= full / 2 && d <= full, `attempt ${attempt}: ${d}`);
    }
    assert(retryDelay(100) <= RETRY_MAX_MS);
  });
  await t.step("parseRetryAfter() reads seconds and HTTP dates", () => {
    assertEquals(parseRetryAfter("1"), 1000);
    assertEquals(parseRetryAfter(null), undefined);
    assertEquals(parseRetryAfter("soon"), undefined);
    assertEquals(parseRetryAfter("100000"), 60_000);
    const date = parseRetryAfter(new Date(Date.now() + 5000).toUTCString())!;
    assert(date > 3000 && date <= 5000, String(date));
  });
  await t.step("isLoopbackHost() accepts localhost, 127/8 and ::1 only", () => {
    for (
      const [host, want] of [
        ["localhost:5000", true],
        ["127.0.0.1:5000", true],
        ["127.9.8.7", true],
        ["[::1]:5000", true],
        ["10.0.0.1:5000", false],
        ["localhost.example.com", false],
        ["ghcr.io", false],
      ] as const
    ) assertEquals(isLoopbackHost(host), want, host);
  });
});

Deno.test("createRegistrySink() over plain HTTP: skopeo reads back the same digests", async (t) => {
  await withRegistry(async (registry) => {
    const image = syntheticImage([3 * 1024 * 1024 + 17, 200 * 1024, 0]);
    const lines: string[] = [];
    await t.step("a streamed push is served byte for byte", async () => {
      const s = sink(registry.host, { log: (l) => lines.push(l) });
      const produced = await pushImage(s, image);
      assertEquals(produced, [1, 1, 1]);
      assertEquals(s.digestReference, `${registry.host}/t/n@${image.manifest.descriptor.digest}`);
      assertEquals(s.stats.blobsSkipped, 0);
      assertEquals(s.stats.blobsUploaded, 4); // 3 layers + config
      const total = image.layers.reduce((n, l) => n + l.descriptor.size, 0);
      assertEquals(
        s.stats.bytesUploaded,
        total + image.config.bytes.length + image.manifest.bytes.length,
      );
      assertEquals(s.stats.retries, 0);
      assertEquals(s.stats.blobs.length, 4);
      await assertServes(registry.host, image);
    });
    await t.step("the --verbose log names method, URL and status, one line per request", () => {
      const methods = new Set(lines.map((l) => l.split(" ")[0]));
      for (const m of ["GET", "HEAD", "POST", "PATCH", "PUT"]) assert(methods.has(m), m);
      assert(
        lines.some((l) => /^PUT http:\/\/127\.0\.0\.1:\d+\/v2\/t\/n\/manifests\/1 201/.test(l)),
      );
      assert(!lines.some((l) => l.includes("_state")), "upload state query is not logged");
    });
    await t.step("re-pushing the same image skips every blob", async () => {
      const s = sink(registry.host);
      let produced = 0;
      for (const layer of image.layers) {
        await pushBlobWithRetry(s, () => {
          produced++;
          return Promise.resolve(layer.descriptor);
        }, { mediaType: layer.descriptor.mediaType, expected: layer.descriptor });
      }
      await s.putBlob(image.config);
      await s.commit(image.record);
      assertEquals(produced, 0);
      assertEquals(s.stats.blobsSkipped, 4);
      assertEquals(s.stats.blobsUploaded, 0);
      assertEquals(s.stats.bytesUploaded, image.manifest.bytes.length);
    });
    await t.step(
      "an index and its manifests are pushed; skopeo --raw shows the index",
      async () => {
        const amd = syntheticImage([100_000], "multi", "amd64");
        const arm = syntheticImage([120_000], "multi", "arm64");
        const index = jsonBlob(MediaType.Index, {
          schemaVersion: 2,
          mediaType: MediaType.Index,
          manifests: [
            { ...amd.manifest.descriptor, platform: { os: "linux", architecture: "amd64" } },
            { ...arm.manifest.descriptor, platform: { os: "linux", architecture: "arm64" } },
          ],
        });
        const s = sink(registry.host, { reference: parseReference(`${registry.host}/t/n:multi`) });
        for (const img of [amd, arm]) {
          for (const l of img.layers) {
            await pushBlobWithRetry(s, async (w) => {
              await w.write(l.bytes);
              return l.descriptor;
            }, { mediaType: l.descriptor.mediaType });
          }
          await s.putBlob(img.config);
          await s.putBlob(img.manifest);
        }
        await s.commit({
          ...amd.record,
          root: index,
          images: [amd.record.images[0], arm.record.images[0]],
        });
        assertEquals(s.digestReference, `${registry.host}/t/n@${index.descriptor.digest}`);
        const raw = await skopeo(
          "inspect",
          "--tls-verify=false",
          "--raw",
          `docker://${registry.host}/t/n:multi`,
        );
        assertEquals(raw, new TextDecoder().decode(index.bytes));
        assertEquals(sha256Digest(new TextEncoder().encode(raw)), index.descriptor.digest);
        const child = await skopeo(
          "inspect",
          "--tls-verify=false",
          "--raw",
          `docker://${registry.host}/t/n@${arm.manifest.descriptor.digest}`,
        );
        assertEquals(child, new TextDecoder().decode(arm.manifest.bytes));
        const info = JSON.parse(
          await skopeo(
            "inspect",
            "--tls-verify=false",
            "--override-arch",
            "arm64",
            `docker://${registry.host}/t/n:multi`,
          ),
        );
        assertEquals(info.Layers, [arm.layers[0].descriptor.digest]);
      },
    );
  });
});

Deno.test("createRegistrySink() chunked upload: Content-Range chunks against the real registry", async (t) => {
  await withRegistry(async (registry) => {
    const chunk = 5_000_000;
    const cases: {
      name: string;
      fault: (r: ProxyRequest, n: { patch: number }) => Fault | undefined;
      ranges: string[];
      retried: boolean;
      /** How often the blob is generated: 1 unless the upload must start over. */
      produced?: number;
    }[] = [
      {
        name: "a 12 MB blob goes as 5 MB chunks with inclusive ranges",
        fault: () => undefined,
        ranges: ["0-4999999", "5000000-9999999", "10000000-11999999"],
        retried: false,
      },
      {
        name: "OCI-Chunk-Min-Length raises the chunk size",
        fault: (r) =>
          r.method === "POST"
            ? { responseHeaders: { "OCI-Chunk-Min-Length": "6000000" } }
            : undefined,
        ranges: ["0-5999999", "6000000-11999999"],
        retried: false,
      },
      {
        name: "a 500 on a chunk is retried in place, the blob is not regenerated",
        fault: (r, n) => r.method === "PATCH" && ++n.patch === 2 ? { status: 500 } : undefined,
        ranges: ["0-4999999", "5000000-9999999", "5000000-9999999", "10000000-11999999"],
        retried: true,
      },
      {
        // distribution signs the offset into the upload URL's _state, so a PATCH that broke
        // mid-way leaves a session it no longer recognises (GET answers 404): the only way
        // on is a new session, with the blob regenerated from the seed.
        name:
          "a reset mid-chunk checks the session and, as distribution drops it, resends the blob",
        fault: (r, n) => r.method === "PATCH" && ++n.patch === 1 ? { reset: 1_000_000 } : undefined,
        ranges: ["0-4999999", "0-4999999", "5000000-9999999", "10000000-11999999"],
        retried: true,
        produced: 2,
      },
    ];
    for (const c of cases) {
      await t.step(c.name, async () => {
        const counter = { patch: 0 };
        const proxy = startFaultProxy(registry.port, (r) => c.fault(r, counter));
        try {
          const image = syntheticImage([12_000_000]);
          const s = sink(proxy.host, { chunkSize: chunk });
          const produced = await pushImage(s, image);
          assertEquals(produced, [c.produced ?? 1]);
          const patches = proxy.requests.filter((r) => r.method === "PATCH");
          assertEquals(patches.map((r) => r.headers["content-range"]), c.ranges);
          if (c.produced === 2) {
            assert(
              proxy.requests.some((r) => r.method === "GET" && r.path.includes("/blobs/uploads/")),
              "the session was checked before starting over",
            );
          }
          for (const p of patches) {
            const [a, b] = p.headers["content-range"].split("-").map(Number);
            assertEquals(Number(p.headers["content-length"]), b - a + 1);
          }
          assertEquals(s.stats.retries > 0, c.retried);
          await assertServes(registry.host, image);
        } finally {
          await proxy.stop();
        }
      });
    }
  });
});

Deno.test("createRegistrySink() survives faults from a proxy and fails cleanly when retries run out", async (t) => {
  await withRegistry(async (registry) => {
    await t.step(
      "reset mid-PATCH, 500 on the second request, 429 with Retry-After: 1",
      async () => {
        let patches = 0;
        let puts = 0;
        const proxy = startFaultProxy(registry.port, (r) => {
          if (r.index === 2) return { status: 500 };
          if (r.method === "PATCH" && ++patches === 1) return { reset: 1_000_000 };
          if (r.method === "PUT" && r.path.includes("digest=") && ++puts === 1) {
            return { status: 429, headers: { "Retry-After": "1" } };
          }
          return undefined;
        });
        try {
          const image = syntheticImage([4 * 1024 * 1024]);
          const s = sink(proxy.host);
          const start = performance.now();
          const produced = await pushImage(s, image);
          const elapsed = performance.now() - start;
          assertEquals(produced, [2], "the reset blob was regenerated once");
          assert(s.stats.retries >= 3, `retries: ${s.stats.retries}`);
          assert(elapsed >= 1000, `Retry-After honoured: ${elapsed} ms`);
          assertEquals(s.stats.blobs[0].digest, image.layers[0].descriptor.digest);
          assert(
            s.stats.bytesSent > s.stats.bytesUploaded,
            "the broken attempt is counted as sent",
          );
          await assertServes(registry.host, image);
        } finally {
          await proxy.stop();
        }
      },
    );

    await t.step("a 5xx on the streamed PATCH regenerates the blob", async () => {
      let patches = 0;
      const proxy = startFaultProxy(
        registry.port,
        (r) => r.method === "PATCH" && ++patches === 1 ? { status: 503 } : undefined,
      );
      try {
        const image = syntheticImage([2 * 1024 * 1024]);
        const s = sink(proxy.host, { reference: parseReference(`${proxy.host}/t/n:p5`) });
        assertEquals(await pushImage(s, { ...image, record: { ...image.record, tag: "p5" } }), [2]);
        await assertServes(registry.host, image, "p5");
      } finally {
        await proxy.stop();
      }
    });

    const exhausted: {
      name: string;
      fault: (r: ProxyRequest) => Fault | undefined;
      status: number;
      method: string;
    }[] = [
      {
        name: "a reset on every PATCH fails with status 0 after the retries",
        fault: (r) => r.method === "PATCH" ? { reset: 100_000 } : undefined,
        status: 0,
        method: "PATCH",
      },
      {
        name: "a 503 on every POST fails with 503 after the retries",
        fault: (r) => r.method === "POST" ? { status: 503 } : undefined,
        status: 503,
        method: "POST",
      },
    ];
    for (const c of exhausted) {
      await t.step(c.name, async () => {
        const proxy = startFaultProxy(registry.port, c.fault);
        try {
          const image = syntheticImage([1024 * 1024]);
          const s = sink(proxy.host, {
            reference: parseReference(`${proxy.host}/t/n:fail`),
            retries: 2,
          });
          const err = await assertRejects(
            () => pushImage(s, { ...image, record: { ...image.record, tag: "fail" } }),
            RegistryError,
          );
          assert(!isRetryableBlobError(err));
          assertEquals(err.status, c.status);
          assertEquals(err.method, c.method);
          assert(err.url.startsWith(`http://${proxy.host}/v2/t/n/blobs/uploads/`), err.url);
          assert(!err.url.includes("?"), "no query (upload state) in the URL");
          assert(/retries/.test(err.message), err.message);
          const r = await run([
            "skopeo",
            "inspect",
            "--tls-verify=false",
            `docker://${registry.host}/t/n:fail`,
          ]);
          assert(r.code !== 0, "nothing was tagged");
        } finally {
          await proxy.stop();
        }
      });
    }

    await t.step("a regenerated blob with a different digest is a hard error", async () => {
      let puts = 0;
      const proxy = startFaultProxy(
        registry.port,
        (r) =>
          r.method === "PUT" && ++puts === 1
            ? { status: 404, code: "BLOB_UPLOAD_UNKNOWN" }
            : undefined,
      );
      try {
        const s = sink(proxy.host);
        let attempt = 0;
        const err = await assertRejects(() =>
          pushBlobWithRetry(s, async (w) => {
            const bytes = randomBytes(1000 + attempt++);
            await w.write(bytes);
            return { mediaType: MediaType.Layer, digest: sha256Digest(bytes), size: bytes.length };
          }, { mediaType: MediaType.Layer }), BlobMismatchError);
        assert(/not deterministic/.test(err.message), err.message);
        assertEquals(attempt, 2);
        await s.abort();
      } finally {
        await proxy.stop();
      }
    });
  });
});

/** What `--json` prints for a push run. */
type PushSummary = Omit<NativeSummary, "printed">;

Deno.test("imgmkr --output push uploads each layer once its digest is known, not after all", async () => {
  await withRegistry(async (registry) => {
    const ref = `localhost:${registry.port}/t/pipelined:1`;
    // One layer at a time makes the order plain: hash 1, push 1, hash 2, push 2.
    const r = await runCli([
      "--layer-sizes",
      "12MB,9MB",
      "--seed",
      "21",
      "--no-cache",
      "--max-concurrent",
      "1",
      "--output",
      "push",
      ref,
    ]);
    assertEquals(r.code, 0, r.stderr);
    const lines = r.stderr.split("\n").map((l) => l.trim());
    const at = (prefix: string) => {
      const i = lines.findIndex((l) => l.startsWith(prefix));
      assert(i >= 0, `no line starting '${prefix}' in:\n${r.stderr}`);
      return i;
    };
    assert(at("layer1 (1 file): done") < at("push layer1: done"), r.stderr);
    assert(at("push layer1: done") < at("layer2 (1 file): done"), r.stderr);
    assert(at("layer2 (1 file): done") < at("push layer2: done"), r.stderr);
    const info = JSON.parse(await skopeo("inspect", "--tls-verify=false", `docker://${ref}`));
    assertEquals(r.stdout, `localhost:${registry.port}/t/pipelined@${info.Digest}\n`);
  });
});

Deno.test("imgmkr --output push: the pushed image is what oci: writes, and docker pulls it", async (t) => {
  await requireDocker();
  await withRegistry(async (registry) => {
    const ref = `localhost:${registry.port}/t/p:1`;
    const args = ["--layer-sizes", "200MB,1MB", "--seed", "5"];
    let pushed = "";
    await t.step("the push prints <repo>@<digest>, which skopeo confirms", async () => {
      const r = await runCli([...args, "--output", "push", ref]);
      assertEquals(r.code, 0, r.stderr);
      const info = JSON.parse(await skopeo("inspect", "--tls-verify=false", `docker://${ref}`));
      assertEquals(r.stdout, `localhost:${registry.port}/t/p@${info.Digest}\n`);
      pushed = info.Digest;
    });
    await t.step("an oci: output of the same seed has the same digests", async () => {
      await withTempDir(async (dir) => {
        const r = await runCli([...args, "--output", `oci:${dir}/l`, "--json", "--quiet", ref]);
        assertEquals(r.code, 0, r.stderr);
        const s = JSON.parse(r.stdout) as PushSummary;
        assertEquals(s.digest, pushed);
        const info = JSON.parse(await skopeo("inspect", "--tls-verify=false", `docker://${ref}`));
        assertEquals(info.Layers, s.layers.map((l) => l.digest));
      });
    });
    await t.step("skopeo copy to oci: and umoci unpack show the exact file sizes", async () => {
      await withTempDir(async (dir) => {
        await skopeo("copy", "--src-tls-verify=false", `docker://${ref}`, `oci:${dir}/l:1`);
        await mustRun(["umoci", "unpack", "--image", `${dir}/l:1`, `${dir}/b`]);
        const files = await listFiles(`${dir}/b/rootfs`);
        assertEquals(
          [...files.entries()].map(([p, f]) => [p, f.size]),
          [["layer1/200.00MB-file", 200 * 1024 * 1024], ["layer2/1.00MB-file", 1024 * 1024]],
        );
      });
    });
    await t.step("docker pull gets the image with the pushed digest", async () => {
      try {
        await mustRun(["docker", "pull", "--quiet", ref]);
        const digests = await mustRun([
          "docker",
          "image",
          "inspect",
          "--format",
          "{{json .RepoDigests}}",
          ref,
        ]);
        assertEquals(JSON.parse(digests), [`localhost:${registry.port}/t/p@${pushed}`]);
      } finally {
        await run(["docker", "rmi", "-f", ref]);
      }
    });
    await t.step(
      "re-pushing the same seed skips every blob, even without the layer cache",
      async () => {
        const r = await runCli([
          ...args,
          "--output",
          "push",
          "--no-cache",
          "--json",
          "--quiet",
          ref,
        ]);
        assertEquals(r.code, 0, r.stderr);
        const s = JSON.parse(r.stdout) as PushSummary;
        assertEquals(s.digest, pushed);
        assertEquals(s.push!.blobsUploaded, 0);
        assertEquals(s.push!.blobsSkipped, 3, "2 layers and the config");
      },
    );
    await t.step(
      "the layer cache skips the hashing pass of a later push; --no-cache does not",
      async () => {
        await withTempDir(async (cacheHome) => {
          const push = async (repo: string, extra: string[] = []) => {
            const r = await runCli(
              [
                "--layer-sizes",
                "8MB",
                "--seed",
                "12",
                "--output",
                "push",
                "--json",
                ...extra,
                `localhost:${registry.port}/t/${repo}:1`,
              ],
              { env: { XDG_CACHE_HOME: cacheHome } },
            );
            return {
              ...r,
              summary: r.code === 0 ? JSON.parse(r.stdout) as PushSummary : undefined,
            };
          };
          const cold = await push("cache1");
          assertEquals(cold.code, 0, cold.stderr);
          assert(!cold.stderr.includes("from the layer cache"), cold.stderr);
          const warm = await push("cache2");
          assertEquals(warm.code, 0, warm.stderr);
          assert(/layer1: sha256:[0-9a-f]{12} from the layer cache/.test(warm.stderr), warm.stderr);
          assertEquals(warm.summary!.digest, cold.summary!.digest);
          assertEquals(warm.summary!.layers, cold.summary!.layers);
          assertEquals(
            warm.summary!.push!.blobsUploaded,
            2,
            "a new repository gets the layer and config",
          );
          const info = JSON.parse(
            await skopeo(
              "inspect",
              "--tls-verify=false",
              `docker://localhost:${registry.port}/t/cache2:1`,
            ),
          );
          assertEquals(info.Digest, cold.summary!.digest);
          const again = await push("cache1");
          assertEquals(again.code, 0, again.stderr);
          assertEquals(again.summary!.push!.blobsUploaded, 0, "cached digests are HEADed first");
          const off = await push("cache3", ["--no-cache"]);
          assertEquals(off.code, 0, off.stderr);
          assert(!off.stderr.includes("from the layer cache"), off.stderr);

          // A cache entry that lies about the digest: the upload pass finds out and stops.
          const dir = `${cacheHome}/imgmkr/layers`;
          for (const entry of Deno.readDirSync(dir)) {
            const path = `${dir}/${entry.name}`;
            const cached = JSON.parse(Deno.readTextFileSync(path));
            cached.descriptor.digest = `sha256:${"0".repeat(64)}`;
            Deno.writeTextFileSync(path, JSON.stringify(cached));
          }
          const lied = await push("cache4");
          assertEquals(lied.code, 1, lied.stderr);
          const last = lied.stderr.trimEnd().split("\n").at(-1)!;
          assert(last.includes("the digest came from the layer cache"), last);
          assert(last.includes("--no-cache"), last);
          const tagged = await run([
            "skopeo",
            "inspect",
            "--tls-verify=false",
            `docker://localhost:${registry.port}/t/cache4:1`,
          ]);
          assert(tagged.code !== 0, "nothing was tagged");
        });
      },
    );
    await t.step(
      "--chunk-size 5MB pushes in chunks; --json reports bytes and MB/s per blob",
      async () => {
        const chunked = `localhost:${registry.port}/t/chunked:1`;
        const r = await runCli([
          "--layer-sizes",
          "12MB",
          "--seed",
          "6",
          "--chunk-size",
          "5MB",
          "--output",
          "push",
          "--json",
          "--verbose",
          chunked,
        ]);
        assertEquals(r.code, 0, r.stderr);
        const patches = r.stderr.split("\n").filter((l) => /^\s+PATCH .* 202 /.test(l));
        assertEquals(patches.length, 3, "12 MB in chunks of 5 MB");
        const s = JSON.parse(r.stdout) as PushSummary;
        assertEquals(s.push!.blobsUploaded, 2, "the layer and the config");
        assert(s.push!.blobs.every((b) => b.mbPerSecond > 0));
        const info = JSON.parse(
          await skopeo("inspect", "--tls-verify=false", `docker://${chunked}`),
        );
        assertEquals(info.Digest, s.digest);
      },
    );
    await t.step("several platforms push an index that skopeo --raw shows", async () => {
      const multi = `localhost:${registry.port}/t/multi:1`;
      const r = await runCli([
        "--layer-sizes",
        "1MB",
        "--platform",
        "linux/amd64,linux/arm64",
        "--output",
        "push",
        "--json",
        "--quiet",
        multi,
      ]);
      assertEquals(r.code, 0, r.stderr);
      const s = JSON.parse(r.stdout) as PushSummary;
      const raw = await skopeo("inspect", "--tls-verify=false", "--raw", `docker://${multi}`);
      assertEquals(sha256Digest(new TextEncoder().encode(raw)), s.digest);
      const index = JSON.parse(raw);
      assertEquals(index.mediaType, MediaType.Index);
      assertEquals(
        index.manifests.map((m: { platform: { architecture: string } }) => m.platform.architecture),
        ["amd64", "arm64"],
      );
    });
  });
});

/**
 * An in-process upload endpoint for the one fault distribution never shows:
 * a chunk that fails with 500 after the server kept part of it, so the
 * session's Range ends inside the chunk. Only what the chunked path needs.
 */
function startPartialChunkServer(keep: number) {
  const stored: Uint8Array[] = [];
  let size = 0;
  let patches = 0;
  const ranges: string[] = [];
  const upload = "/v2/t/n/blobs/uploads/u1";
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, async (req) => {
    const url = new URL(req.url);
    if (req.method === "GET" && url.pathname === "/v2/") return new Response(null, { status: 200 });
    if (req.method === "POST") {
      return new Response(null, { status: 202, headers: { Location: upload } });
    }
    const range = { Location: upload, Range: `0-${Math.max(0, size - 1)}` };
    if (req.method === "GET") return new Response(null, { status: 204, headers: range });
    if (req.method === "PATCH") {
      ranges.push(req.headers.get("content-range") ?? "");
      const body = new Uint8Array(await req.arrayBuffer());
      const [start] = (req.headers.get("content-range") ?? "").split("-").map(Number);
      if (start !== size) return new Response(null, { status: 416, headers: range });
      const failing = ++patches === 1;
      const kept = failing ? body.subarray(0, keep) : body;
      stored.push(kept.slice());
      size += kept.length;
      return new Response(null, {
        status: failing ? 500 : 202,
        headers: { Location: upload, Range: `0-${size - 1}` },
      });
    }
    if (req.method === "PUT") {
      const all = new Uint8Array(size);
      let off = 0;
      for (const s of stored) {
        all.set(s, off);
        off += s.length;
      }
      const ok = url.searchParams.get("digest") === sha256Digest(all);
      return new Response(null, { status: ok ? 201 : 400 });
    }
    return new Response(null, { status: 404 });
  });
  return { host: `127.0.0.1:${server.addr.port}`, ranges, stop: () => server.shutdown() };
}

Deno.test("chunked upload resumes from the Range a registry reports after a broken chunk", async () => {
  const server = startPartialChunkServer(1_000_000);
  try {
    const image = syntheticImage([12_000_000]);
    const layer = image.layers[0];
    const s = sink(server.host, { chunkSize: 5_000_000, plainHttp: true });
    let produced = 0;
    const desc = await pushBlobWithRetry(s, async (w) => {
      produced++;
      for (let off = 0; off < layer.bytes.length; off += WRITE_SLICE) {
        await w.write(layer.bytes.subarray(off, off + WRITE_SLICE));
      }
      return layer.descriptor;
    }, { mediaType: layer.descriptor.mediaType });
    s.close();
    assertEquals(desc, layer.descriptor);
    assertEquals(produced, 1, "resumed in place, not regenerated");
    assertEquals(server.ranges, [
      "0-4999999",
      "1000000-4999999",
      "5000000-9999999",
      "10000000-11999999",
    ]);
  } finally {
    await server.stop();
  }
});
