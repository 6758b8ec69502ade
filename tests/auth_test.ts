/**
 * Registry auth, end to end: the real `main.ts` pushes to Debian's
 * `docker-registry` on 127.0.0.1 behind htpasswd Basic auth over TLS (a test
 * CA passed with --ca-cert) and behind token auth (a token server of the
 * tests issuing ES256 JWTs). Credentials come from each place docker looks.
 */

import { basicAuthorization, findCredential, parseWwwAuthenticate } from "../lib/auth.ts";
import { assert, assertEquals, assertMatch, assertStringIncludes } from "./support/assert.ts";
import { runCli, withTempDir, writeScript } from "./support/cli.ts";
import { run } from "./support/docker.ts";
import {
  makePki,
  mustRun,
  type RegistryServer,
  startRegistry,
  startTokenServer,
  type TestPki,
} from "./support/registry.ts";

const USER = "tester";
const PASSWORD = "s3cret-Pa55-do-not-print";
const WRONG = "wrong-Pa55-do-not-print";
/** A small two-layer image: auth is what is tested, not throughput. */
const IMAGE = ["--layer-sizes", "2MB,10KB", "--seed", "11"];

/** Asserts that no secret appears anywhere in a run's output. */
function assertNoSecret(r: { stdout: string; stderr: string }, secrets: string[]): void {
  for (const s of secrets) {
    assert(!r.stdout.includes(s) && !r.stderr.includes(s), `a secret was printed:\n${r.stderr}`);
    const b64 = btoa(`${USER}:${s}`);
    assert(!r.stderr.includes(b64), "a Basic header was printed");
  }
  assert(!/Bearer ey|"token"|access_token/.test(r.stderr), `a token was printed:\n${r.stderr}`);
}

/** skopeo's view of a pushed tag's digest, with the test CA and credentials. */
async function pushedDigest(host: string, ref: string, caDir: string): Promise<string> {
  const out = await mustRun([
    "skopeo",
    "inspect",
    "--cert-dir",
    caDir,
    "--creds",
    `${USER}:${PASSWORD}`,
    `docker://${host}/${ref}`,
  ]);
  return JSON.parse(out).Digest;
}

/** Starts the TLS + htpasswd registry, runs `fn`, stops it. */
async function withBasicRegistry(
  fn: (registry: RegistryServer, pki: TestPki, caDir: string) => Promise<void>,
): Promise<void> {
  await withTempDir(async (dir) => {
    const pki = await makePki(dir);
    // skopeo reads CA files named *.crt from a directory.
    const caDir = `${dir}/ca`;
    await Deno.mkdir(caDir);
    await Deno.copyFile(pki.caCert, `${caDir}/ca.crt`);
    const registry = await startRegistry({
      tls: { cert: pki.serverCert, key: pki.serverKey },
      htpasswd: { [USER]: PASSWORD },
    });
    try {
      await fn(registry, pki, caDir);
    } catch (err) {
      throw new Error(`${(err as Error).message}\nregistry log:\n${registry.logs()}`, {
        cause: err,
      });
    } finally {
      await registry.stop();
    }
  });
}

Deno.test("push over TLS with htpasswd Basic auth takes credentials from each place docker looks", async (t) => {
  await withBasicRegistry(async (registry, pki, caDir) => {
    const push = (tag: string, extra: string[] = []) => [
      ...IMAGE,
      "--output",
      "push",
      "--ca-cert",
      pki.caCert,
      "--verbose",
      ...extra,
      `${registry.host}/t/auth:${tag}`,
    ];
    const cases: {
      name: string;
      tag: string;
      setup: (dir: string) => { env: Record<string, string>; args?: string[]; stdin?: string };
    }[] = [
      {
        name: "auths in $DOCKER_CONFIG/config.json",
        tag: "config",
        setup: (dir) => {
          Deno.writeTextFileSync(
            `${dir}/config.json`,
            JSON.stringify({
              auths: { [registry.host]: { auth: btoa(`${USER}:${PASSWORD}`) } },
            }),
          );
          return { env: { DOCKER_CONFIG: dir } };
        },
      },
      {
        name: "a docker-credential-<name> helper named in credHelpers",
        tag: "helper",
        setup: (dir) => {
          writeScript(
            dir,
            "docker-credential-imgmkrtest",
            // Answers only for the server it is asked about, as real helpers do.
            `read server\nif [ "$1" = get ] && [ "$server" = "${registry.host}" ]; then\n` +
              `  printf '{"ServerURL":"%s","Username":"${USER}","Secret":"${PASSWORD}"}' "$server"\n` +
              `else echo "credentials not found in native keychain"; exit 1; fi`,
          );
          Deno.writeTextFileSync(
            `${dir}/config.json`,
            JSON.stringify({ credHelpers: { [registry.host]: "imgmkrtest" } }),
          );
          return { env: { DOCKER_CONFIG: dir, PATH: `${dir}:${Deno.env.get("PATH")}` } };
        },
      },
      {
        name: "--username with --password-stdin",
        tag: "stdin",
        setup: (dir) => ({
          env: { DOCKER_CONFIG: dir },
          args: ["--username", USER, "--password-stdin"],
          stdin: `${PASSWORD}\n`,
        }),
      },
      {
        name: "podman's REGISTRY_AUTH_FILE",
        tag: "podman",
        setup: (dir) => {
          Deno.writeTextFileSync(
            `${dir}/auth.json`,
            JSON.stringify({ auths: { [registry.host]: { auth: btoa(`${USER}:${PASSWORD}`) } } }),
          );
          return { env: { DOCKER_CONFIG: `${dir}/none`, REGISTRY_AUTH_FILE: `${dir}/auth.json` } };
        },
      },
    ];
    for (const c of cases) {
      await t.step(c.name, async () => {
        await withTempDir(async (dir) => {
          const { env, args = [], stdin } = c.setup(dir);
          const r = await runCli(push(c.tag, args), { env, stdin });
          assertEquals(r.code, 0, r.stderr);
          const digest = await pushedDigest(registry.host, `t/auth:${c.tag}`, caDir);
          assertEquals(r.stdout.trim(), `${registry.host}/t/auth@${digest}`);
          assertStringIncludes(r.stderr, "[Authorization redacted]");
          assertNoSecret(r, [PASSWORD]);
        });
      });
    }

    await t.step(
      "a wrong password exits 1 naming the source and the fix, printing no secret",
      async () => {
        await withTempDir(async (dir) => {
          const r = await runCli(
            push("wrong", ["--username", USER, "--password-stdin"]),
            { env: { DOCKER_CONFIG: dir }, stdin: WRONG },
          );
          assertEquals(r.code, 1, r.stderr);
          assertEquals(r.stdout, "");
          const last = r.stderr.trimEnd().split("\n").at(-1)!;
          assertMatch(
            last,
            /^imgmkr: error: 401 UNAUTHORIZED from GET https:\/\/127\.0\.0\.1:\d+\/v2\//,
          );
          assertStringIncludes(last, `user '${USER}' (from --username)`);
          assertStringIncludes(last, `docker login ${registry.host}`);
          assertNoSecret(r, [WRONG, PASSWORD]);
          const tagged = await run([
            "skopeo",
            "inspect",
            "--cert-dir",
            caDir,
            "--creds",
            `${USER}:${PASSWORD}`,
            `docker://${registry.host}/t/auth:wrong`,
          ]);
          assert(tagged.code !== 0, "nothing was tagged");
        });
      },
    );

    await t.step("no credentials at all exits 1 and says how to log in", async () => {
      await withTempDir(async (dir) => {
        const r = await runCli(push("none"), {
          env: {
            DOCKER_CONFIG: dir,
            REGISTRY_AUTH_FILE: undefined,
            XDG_RUNTIME_DIR: dir,
            HOME: dir,
          },
        });
        assertEquals(r.code, 1, r.stderr);
        assertStringIncludes(r.stderr, "none were found");
        assertStringIncludes(r.stderr, `docker login ${registry.host}`);
      });
    });

    await t.step("without --ca-cert the TLS failure names --ca-cert", async () => {
      await withTempDir(async (dir) => {
        const r = await runCli(
          [
            ...IMAGE,
            "--output",
            "push",
            "--username",
            USER,
            "--password-stdin",
            `${registry.host}/t/auth:noca`,
          ],
          { env: { DOCKER_CONFIG: dir }, stdin: PASSWORD },
        );
        assertEquals(r.code, 1, r.stderr);
        const last = r.stderr.trimEnd().split("\n").at(-1)!;
        assertStringIncludes(last, "invalid peer certificate");
        assertStringIncludes(last, "pass --ca-cert <file>");
        assertNoSecret(r, [PASSWORD]);
      });
    });
  });
});

Deno.test("push with token auth: a JWT from the token server, identity tokens, and a refused scope", async (t) => {
  await withTempDir(async (dir) => {
    const pki = await makePki(dir);
    const tokens = await startTokenServer({
      users: { [USER]: PASSWORD, reader: PASSWORD },
      refreshTokens: { "refresh-0123-do-not-print": USER },
      // `reader` may pull but never push.
      grant: (user) => user === USER ? ["pull", "push"] : user === "reader" ? ["pull"] : [],
      pki,
    });
    const registry = await startRegistry({
      token: {
        realm: tokens.realm,
        service: tokens.service,
        issuer: tokens.issuer,
        rootCertBundle: pki.tokenCert,
      },
    });
    try {
      const ref = (tag: string) => `${registry.host}/t/tok:${tag}`;
      await t.step(
        "--password-stdin: GET with Basic for scope pull,push, then the push",
        async () => {
          const r = await runCli(
            [
              ...IMAGE,
              "--output",
              "push",
              "--username",
              USER,
              "--password-stdin",
              "--verbose",
              ref("1"),
            ],
            { env: { DOCKER_CONFIG: dir }, stdin: PASSWORD },
          );
          assertEquals(r.code, 0, r.stderr);
          assertMatch(r.stdout.trim(), /^127\.0\.0\.1:\d+\/t\/tok@sha256:[0-9a-f]{64}$/);
          const got = tokens.requests.filter((q) => q.status === 200);
          assert(got.length >= 1, "a token was issued");
          assertEquals(got[0].method, "GET");
          assertEquals(got[0].user, USER);
          assertEquals(got[0].scopes, ["repository:t/tok:pull,push"]);
          assertNoSecret(r, [PASSWORD]);
        },
      );
      await t.step(
        "an identitytoken in config.json is exchanged by POST grant_type=refresh_token",
        async () => {
          await withTempDir(async (cfg) => {
            Deno.writeTextFileSync(
              `${cfg}/config.json`,
              JSON.stringify({
                auths: { [registry.host]: { identitytoken: "refresh-0123-do-not-print" } },
              }),
            );
            const before = tokens.requests.length;
            const r = await runCli([...IMAGE, "--output", "push", "--verbose", ref("2")], {
              env: { DOCKER_CONFIG: cfg },
            });
            assertEquals(r.code, 0, r.stderr);
            const posts = tokens.requests.slice(before).filter((q) => q.method === "POST");
            assert(posts.length >= 1, "the refresh token was used");
            assertEquals(posts[0].grantType, "refresh_token");
            assertEquals(posts[0].user, USER);
            assertNoSecret(r, ["refresh-0123-do-not-print"]);
          });
        },
      );
      await t.step(
        "a user the token server grants only pull fails clearly and tags nothing",
        async () => {
          const r = await runCli(
            [...IMAGE, "--output", "push", "--username", "reader", "--password-stdin", ref("3")],
            { env: { DOCKER_CONFIG: dir }, stdin: PASSWORD },
          );
          assertEquals(r.code, 1, r.stderr);
          const last = r.stderr.trimEnd().split("\n").at(-1)!;
          assertMatch(last, /^imgmkr: error: 401 /);
          assertStringIncludes(last, "user 'reader' (from --username) may not push to t/tok");
          assertStringIncludes(last, "repository:t/tok:pull,push");
          assertNoSecret(r, [PASSWORD]);
        },
      );
      await t.step("a wrong password is refused by the token server itself", async () => {
        const r = await runCli(
          [...IMAGE, "--output", "push", "--username", USER, "--password-stdin", ref("4")],
          { env: { DOCKER_CONFIG: dir }, stdin: WRONG },
        );
        assertEquals(r.code, 1, r.stderr);
        assertStringIncludes(r.stderr, "the token server refused user 'tester' (from --username)");
        assertNoSecret(r, [WRONG, PASSWORD]);
      });
    } finally {
      await registry.stop();
      await tokens.stop();
    }
  });
});

Deno.test("parseWwwAuthenticate() reads Bearer and Basic challenges with quoted commas", async (t) => {
  const cases: [string, { scheme: string; params: Record<string, string> }[]][] = [
    [
      'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push"',
      [{
        scheme: "bearer",
        params: {
          realm: "https://auth.docker.io/token",
          service: "registry.docker.io",
          scope: "repository:a/b:pull,push",
        },
      }],
    ],
    ['Basic realm="Registry Realm"', [{ scheme: "basic", params: { realm: "Registry Realm" } }]],
    [
      'Basic realm="x", Bearer realm="https://t/token",error="insufficient_scope"',
      [
        { scheme: "basic", params: { realm: "x" } },
        { scheme: "bearer", params: { realm: "https://t/token", error: "insufficient_scope" } },
      ],
    ],
    ['Bearer realm="a\\"b"', [{ scheme: "bearer", params: { realm: 'a"b' } }]],
    ["", []],
  ];
  for (const [header, want] of cases) {
    await t.step(header || "(empty)", () => assertEquals(parseWwwAuthenticate(header), want));
  }
});

Deno.test("findCredential() follows docker's order: credHelpers, credsStore, auths, then podman files", async (t) => {
  await withTempDir(async (dir) => {
    const env = (vars: Record<string, string>) => (name: string) => vars[name];
    const basic = (u: string, p: string) => btoa(`${u}:${p}`);
    writeScript(
      dir,
      "docker-credential-fake",
      `read server; printf '{"Username":"helper","Secret":"from-helper"}'`,
    );
    await t.step("an auths entry, keyed by host or by URL", async () => {
      Deno.writeTextFileSync(
        `${dir}/config.json`,
        JSON.stringify({
          auths: {
            "reg.example:5000": { auth: basic("a", "pa") },
            "https://index.docker.io/v1/": { auth: basic("hub", "ph") },
          },
        }),
      );
      const e = env({ DOCKER_CONFIG: dir });
      assertEquals((await findCredential("reg.example:5000", "x", { env: e }))?.username, "a");
      assertEquals((await findCredential("docker.io", "library/x", { env: e }))?.password, "ph");
      assertEquals(await findCredential("other.example", "x", { env: e }), undefined);
    });
    await t.step("credHelpers win over auths for their registry", async () => {
      Deno.writeTextFileSync(
        `${dir}/config.json`,
        JSON.stringify({
          credHelpers: { "reg.example:5000": "fake" },
          auths: { "reg.example:5000": { auth: basic("a", "pa") } },
        }),
      );
      const cred = await findCredential("reg.example:5000", "x", {
        env: env({ DOCKER_CONFIG: dir, PATH: dir }),
      });
      assertEquals([cred?.username, cred?.password], ["helper", "from-helper"]);
    });
    await t.step("a missing helper is an error naming it", async () => {
      Deno.writeTextFileSync(
        `${dir}/config.json`,
        JSON.stringify({ credsStore: "missing" }),
      );
      let message = "";
      try {
        await findCredential("reg.example:5000", "x", {
          env: env({ DOCKER_CONFIG: dir, PATH: dir }),
        });
      } catch (err) {
        message = (err as Error).message;
      }
      assertStringIncludes(message, "docker-credential-missing");
    });
    await t.step(
      "podman's auth.json under XDG_RUNTIME_DIR, with a repository-scoped key",
      async () => {
        await Deno.mkdir(`${dir}/run/containers`, { recursive: true });
        Deno.writeTextFileSync(
          `${dir}/run/containers/auth.json`,
          JSON.stringify({
            auths: {
              "quay.example": { auth: basic("host", "p1") },
              "quay.example/org": { auth: basic("org", "p2") },
            },
          }),
        );
        const e = env({ DOCKER_CONFIG: `${dir}/none`, XDG_RUNTIME_DIR: `${dir}/run` });
        assertEquals(
          (await findCredential("quay.example", "org/app", { env: e }))?.username,
          "org",
        );
        assertEquals(
          (await findCredential("quay.example", "other/app", { env: e }))?.username,
          "host",
        );
      },
    );
  });
});

Deno.test("basicAuthorization() encodes UTF-8 user:password", () => {
  assertEquals(basicAuthorization("ü", "p:w"), `Basic ${btoa("\xc3\xbc:p:w")}`);
});
