/**
 * Builder detection and child processes, with shim scripts on a fake PATH
 * standing in for the builders.
 */

import { assert, assertEquals, assertRejects, assertThrows } from "./support/assert.ts";
import { withTempDir, writeScript } from "./support/cli.ts";
import { BuilderError } from "../lib/errors.ts";
import {
  buildCommand,
  BUILDERS,
  checkDaemon,
  DEFAULT_DOCKER_SOCKET,
  detectBuilder,
  dockerSocket,
  engineApiLoad,
  findOnPath,
  LOADERS,
  runChild,
} from "../lib/engine.ts";

/** Runs `fn` with PATH set to `path`, restoring it afterwards. */
async function withPath<T>(path: string, fn: () => T | Promise<T>): Promise<T> {
  const saved = Deno.env.get("PATH");
  Deno.env.set("PATH", path);
  try {
    return await fn();
  } finally {
    if (saved === undefined) Deno.env.delete("PATH");
    else Deno.env.set("PATH", saved);
  }
}

Deno.test("findOnPath() returns only executable files, searching PATH in order", async (t) => {
  await withTempDir(async (dir) => {
    const [a, b] = [`${dir}/a`, `${dir}/b`];
    await Deno.mkdir(a);
    await Deno.mkdir(b);
    Deno.writeTextFileSync(`${a}/plain`, "not executable");
    await Deno.mkdir(`${a}/adir`, { mode: 0o755 });
    const second = writeScript(b, "tool", "exit 0");
    const first = writeScript(a, "tool", "exit 0");
    writeScript(b, "plain", "exit 0");
    await t.step("the first PATH entry wins", () => {
      assertEquals(findOnPath("tool", { path: `${a}:${b}` }), first);
      assertEquals(findOnPath("tool", { path: `${b}:${a}` }), second);
    });
    await t.step("a non-executable file is skipped for a later executable one", () => {
      assertEquals(findOnPath("plain", { path: `${a}:${b}` }), `${b}/plain`);
    });
    await t.step("directories and missing names are not found; empty entries are ignored", () => {
      assertEquals(findOnPath("adir", { path: a }), undefined);
      assertEquals(findOnPath("nothing", { path: `::${a}:` }), undefined);
      assertEquals(findOnPath("tool", { path: "" }), undefined);
    });
  });
});

Deno.test("detectBuilder() picks finch, docker, podman, nerdctl, buildah in that order", async (t) => {
  const cases: [string[], string][] = [
    [[...BUILDERS], "finch"],
    [["buildah", "nerdctl", "podman", "docker"], "docker"],
    [["buildah", "podman"], "podman"],
    [["buildah", "nerdctl"], "nerdctl"],
    [["buildah"], "buildah"],
  ];
  for (const [present, expected] of cases) {
    await t.step(`with ${present.join(", ")} on PATH: ${expected}`, async () => {
      await withTempDir(async (dir) => {
        for (const name of present) writeScript(dir, name, "exit 0");
        assertEquals(await withPath(dir, () => detectBuilder()), expected);
      });
    });
  }
  await t.step("a requested builder is used even when an earlier one is present", async () => {
    await withTempDir(async (dir) => {
      for (const name of BUILDERS) writeScript(dir, name, "exit 0");
      assertEquals(await withPath(dir, () => detectBuilder({ requested: "podman" })), "podman");
    });
  });
  await t.step("a requested builder missing from PATH is an error naming it", async () => {
    await withTempDir(async (dir) => {
      writeScript(dir, "docker", "exit 0");
      await withPath(
        dir,
        () => assertThrows(() => detectBuilder({ requested: "podman" }), BuilderError, "'podman'"),
      );
    });
  });
  await t.step("no builder at all names the options, including --dry-run", async () => {
    await withTempDir(async (dir) => {
      const e = await withPath(dir, () => assertThrows(() => detectBuilder(), BuilderError));
      for (const part of ["No image builder", "--builder", "--dry-run", ...BUILDERS]) {
        assert(e.message.includes(part), `${e.message} mentions ${part}`);
      }
    });
  });
  await t.step("among LOADERS, buildah alone does not count", async () => {
    await withTempDir(async (dir) => {
      writeScript(dir, "buildah", "exit 0");
      await withPath(
        dir,
        () => assertThrows(() => detectBuilder({ among: LOADERS }), BuilderError),
      );
    });
  });
});

Deno.test("buildCommand() passes the platform, Dockerfile and context, and tags only with BuildKit builders", async (t) => {
  const iid = ["--iidfile", "/c/.imgmkr-image-id"];
  const cases: [Parameters<typeof buildCommand>[0], string[]][] = [
    [
      { builder: "docker", contextDir: "/c", tag: "t/a:1" },
      ["docker", "build", "--platform", "linux/amd64", ...iid, "-f", "/c/Dockerfile", "/c"],
    ],
    [
      { builder: "podman", contextDir: "/c", tag: "t/a:1", platform: "linux/arm64" },
      ["podman", "build", "--platform", "linux/arm64", ...iid, "-f", "/c/Dockerfile", "/c"],
    ],
    [
      { builder: "buildah", contextDir: "/c", tag: "t/a:1" },
      ["buildah", "bud", "--platform", "linux/amd64", ...iid, "-f", "/c/Dockerfile", "/c"],
    ],
    [
      { builder: "nerdctl", contextDir: "/c", tag: "t/a:1" },
      ["nerdctl", "build", "--platform", "linux/amd64", "-t", "t/a:1", "-f", "/c/Dockerfile", "/c"],
    ],
    [
      { builder: "finch", contextDir: "/c", tag: "t/a:1" },
      ["finch", "build", "--platform", "linux/amd64", "-t", "t/a:1", "-f", "/c/Dockerfile", "/c"],
    ],
  ];
  for (const [options, argv] of cases) {
    await t.step(options.builder, () => assertEquals(buildCommand(options), argv));
  }
});

Deno.test("checkDaemon() resolves when '<builder> info' succeeds and names the failure otherwise", async (t) => {
  await withTempDir(async (dir) => {
    await t.step("info exits 0", async () => {
      writeScript(dir, "docker", `[ "$1" = info ] && exit 0; exit 9`);
      await withPath(dir, () => checkDaemon("docker"));
    });
    await t.step("info exits 1: the error quotes the builder's last stderr line", async () => {
      writeScript(
        dir,
        "podman",
        `echo "noise" >&2; echo "Cannot connect to the daemon" >&2; exit 1`,
      );
      await withPath(dir, () =>
        assertRejects(
          () => checkDaemon("podman"),
          BuilderError,
          "'podman info' failed, so its daemon is not reachable: Cannot connect to the daemon",
        ));
    });
  });
});

Deno.test("runChild() streams output, reports the exit code, and kills the child when aborted", async (t) => {
  await t.step("output and exit code", async () => {
    let seen = "";
    const r = await runChild(["sh", "-c", "echo out; echo err >&2; exit 4"], {
      onOutput: (text) => seen += text,
    });
    assertEquals(r.code, 4);
    assert(seen.includes("out") && seen.includes("err"), seen);
    assert(r.tail.includes("out") && r.tail.includes("err"), r.tail);
  });
  await t.step("an abort stops a long-running child promptly", async () => {
    const controller = new AbortController();
    const start = performance.now();
    setTimeout(() => controller.abort(), 200);
    const r = await runChild(["sleep", "30"], { signal: controller.signal });
    assert(performance.now() - start < 5_000, "stopped well before sleep ended");
    assertEquals(r.code, 143, "killed by SIGTERM");
  });
  await t.step("an already-aborted signal stops the child at once", async () => {
    const controller = new AbortController();
    controller.abort();
    const start = performance.now();
    await runChild(["sleep", "30"], { signal: controller.signal });
    assert(performance.now() - start < 5_000);
  });
  await t.step("a child ignoring SIGTERM is killed after the grace period", async () => {
    const controller = new AbortController();
    setTimeout(() => controller.abort(), 200);
    const r = await runChild(["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"], {
      signal: controller.signal,
    });
    assertEquals(r.code, 137, "SIGKILL");
  });
});

Deno.test("dockerSocket() finds the daemon's unix socket only where the docker CLI would use it", async (t) => {
  await withTempDir(async (dir) => {
    const socket = `${dir}/docker.sock`;
    const listener = Deno.listen({ transport: "unix", path: socket });
    try {
      await Deno.writeTextFile(`${dir}/plain-file`, "");
      await Deno.mkdir(`${dir}/ctx`);
      await Deno.writeTextFile(
        `${dir}/ctx/config.json`,
        JSON.stringify({ currentContext: "colima" }),
      );
      await Deno.mkdir(`${dir}/noctx`);
      await Deno.writeTextFile(`${dir}/noctx/config.json`, JSON.stringify({ auths: {} }));
      let defaultIsSocket = false;
      try {
        defaultIsSocket = Deno.statSync(DEFAULT_DOCKER_SOCKET).isSocket === true;
      } catch {
        // no default socket on this machine
      }
      const defaultSocket = defaultIsSocket ? DEFAULT_DOCKER_SOCKET : undefined;
      const cases: { name: string; env: Record<string, string>; want: string | undefined }[] = [
        { name: "a unix:// DOCKER_HOST", env: { DOCKER_HOST: `unix://${socket}` }, want: socket },
        {
          name: "a unix:// DOCKER_HOST that is not a socket",
          env: { DOCKER_HOST: `unix://${dir}/plain-file` },
          want: undefined,
        },
        {
          name: "a unix:// DOCKER_HOST that does not exist",
          env: { DOCKER_HOST: `unix://${dir}/missing.sock` },
          want: undefined,
        },
        {
          name: "a tcp:// DOCKER_HOST",
          env: { DOCKER_HOST: "tcp://127.0.0.1:2375" },
          want: undefined,
        },
        { name: "an ssh:// DOCKER_HOST", env: { DOCKER_HOST: "ssh://me@host" }, want: undefined },
        {
          name: "DOCKER_CONTEXT naming another context",
          env: { DOCKER_CONTEXT: "remote", DOCKER_CONFIG: `${dir}/noctx` },
          want: undefined,
        },
        {
          name: "a currentContext in config.json",
          env: { DOCKER_CONFIG: `${dir}/ctx` },
          want: undefined,
        },
        {
          name: "the default context (the default socket if it is one)",
          env: { DOCKER_CONFIG: `${dir}/noctx` },
          want: defaultSocket,
        },
        {
          name: "DOCKER_HOST wins over a context",
          env: { DOCKER_HOST: `unix://${socket}`, DOCKER_CONFIG: `${dir}/ctx` },
          want: socket,
        },
      ];
      for (const c of cases) {
        await t.step(`${c.name} gives ${c.want ?? "undefined (use the CLI)"}`, () => {
          assertEquals(dockerSocket({ env: c.env }), c.want);
        });
      }
    } finally {
      listener.close();
    }
  });
});

Deno.test("engineApiLoad() speaks the daemon's API version and reports what it says", async (t) => {
  // An in-process stand-in for the Engine API on a unix socket: it answers /_ping with the
  // version given, and POST <prefix>/images/load with the reply given, recording what it got.
  await withTempDir(async (dir) => {
    const cases = [
      {
        name: "a versioned path from /_ping's API-Version; the bytes arrive whole",
        version: "1.47",
        path: "/v1.47/images/load",
        reply: { status: 200, body: '{"stream":"Loaded image: t/x:1\\n"}\n' },
        want: { code: 0, tail: "Loaded image: t/x:1" },
      },
      {
        name: "no API-Version: the unversioned path",
        version: undefined,
        path: "/images/load",
        reply: { status: 200, body: '{"stream":"Loaded image: t/x:1\\n"}\n' },
        want: { code: 0, tail: "Loaded image: t/x:1" },
      },
      {
        name: "an error inside a 200 stream is a failure with its message",
        version: "1.41",
        path: "/v1.41/images/load",
        reply: {
          status: 200,
          body: '{"errorDetail":{"message":"invalid diffID for layer 0"},"error":"x"}\n',
        },
        want: { code: 1, tail: "invalid diffID for layer 0" },
      },
      {
        name: "an HTTP error is its status with the message",
        version: "1.41",
        path: "/v1.41/images/load",
        reply: { status: 500, body: '{"message":"no space left on device"}' },
        want: { code: 500, tail: "no space left on device" },
      },
    ];
    for (const [i, c] of cases.entries()) {
      await t.step(c.name, async () => {
        const socket = `${dir}/engine-${i}.sock`;
        let loadedPath = "";
        let received = 0;
        const server = Deno.serve(
          { transport: "unix", path: socket, onListen: () => {} },
          async (req) => {
            const url = new URL(req.url);
            if (url.pathname === "/_ping") {
              return new Response("OK", {
                headers: c.version ? { "API-Version": c.version } : {},
              });
            }
            loadedPath = `${url.pathname}?${url.searchParams}`;
            for await (const chunk of req.body!) received += chunk.length;
            return new Response(c.reply.body, { status: c.reply.status });
          },
        );
        try {
          const bytes = new Uint8Array(3 * 1024 * 1024 + 5);
          const body = new Blob([bytes]).stream();
          const result = await engineApiLoad(socket, body);
          assertEquals(result, c.want);
          assertEquals(loadedPath, `${c.path}?quiet=1`);
          assertEquals(received, bytes.length);
        } finally {
          await server.shutdown();
        }
      });
    }
  });
});
