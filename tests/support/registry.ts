/**
 * Real registries for tests: Debian's `docker-registry` (distribution v2)
 * on 127.0.0.1 with plain HTTP, htpasswd + TLS or token auth, a small token
 * server issuing ES256 JWTs, a TCP fault proxy, and synthetic images.
 * Everything started here is stopped by its `stop()`.
 *
 * @module
 */

import nodeAssert from "node:assert/strict";
import { run } from "./docker.ts";
import { type Blob, type Descriptor, jsonBlob, MediaType, sha256Digest } from "../../lib/oci.ts";
import type { ImageRecord } from "../../lib/oci.ts";

/** How long to wait for a started registry to accept connections. */
const START_TIMEOUT_MS = 15_000;
/** Lifetime of issued test tokens; long enough for any test. */
const TOKEN_LIFETIME_S = 300;
/** The proxy gives up draining a request body it answers itself after this long. */
const DRAIN_TIMEOUT_MS = 5_000;

/** A free TCP port on 127.0.0.1 (probed by listening on port 0). */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

/** Runs a command and fails with its stderr when it exits non-zero. */
export async function mustRun(cmd: string[], stdin?: Uint8Array): Promise<string> {
  const r = await run(cmd, { stdin });
  if (r.code !== 0) throw new Error(`${cmd.join(" ")} failed (${r.code}): ${r.stderr}`);
  return r.stdout;
}

/** Files of a test PKI made by openssl. */
export interface TestPki {
  /** CA certificate (PEM): pass as `caCert`. */
  caCert: string;
  /** Server certificate for 127.0.0.1 / localhost, signed by the CA. */
  serverCert: string;
  /** Server key. */
  serverKey: string;
  /** Self-signed certificate of the token signing key (the registry's rootcertbundle). */
  tokenCert: string;
  /** Token signing key (PKCS#8 PEM, P-256). */
  tokenKey: string;
}

/** Makes a CA, a server certificate for 127.0.0.1 and a token signing key under `dir`. */
export async function makePki(dir: string): Promise<TestPki> {
  const p = (name: string) => `${dir}/${name}`;
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  await mustRun([
    "openssl",
    "req",
    "-x509",
    ...ec,
    "-keyout",
    p("ca.key"),
    "-out",
    p("ca.crt"),
    "-days",
    "2",
    "-subj",
    "/CN=imgmkr test CA",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
  ]); // deno-fmt-ignore
  await mustRun([
    "openssl", "req", ...ec, "-keyout", p("server.key"), "-out", p("server.csr"),
    "-subj", "/CN=127.0.0.1",
  ]); // deno-fmt-ignore
  await Deno.writeTextFile(
    p("server.ext"),
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n" +
      "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
  );
  await mustRun([
    "openssl",
    "x509",
    "-req",
    "-in",
    p("server.csr"),
    "-CA",
    p("ca.crt"),
    "-CAkey",
    p("ca.key"),
    "-CAcreateserial",
    "-out",
    p("server.crt"),
    "-days",
    "2",
    "-extfile",
    p("server.ext"),
  ]); // deno-fmt-ignore
  await mustRun([
    "openssl", "req", "-x509", ...ec, "-keyout", p("token.key"), "-out", p("token.crt"),
    "-days", "2", "-subj", "/CN=imgmkr test token signer",
  ]); // deno-fmt-ignore
  return {
    caCert: p("ca.crt"),
    serverCert: p("server.crt"),
    serverKey: p("server.key"),
    tokenCert: p("token.crt"),
    tokenKey: p("token.key"),
  };
}

/** Options for {@linkcode startRegistry}. */
export interface StartRegistryOptions {
  /** Serve HTTPS with this certificate and key. @default {undefined} */
  tls?: { cert: string; key: string };
  /** htpasswd users (name → password). @default {undefined} */
  htpasswd?: Record<string, string>;
  /** Token auth settings. @default {undefined} */
  token?: { realm: string; service: string; issuer: string; rootCertBundle: string };
}

/** A running `docker-registry`. */
export interface RegistryServer {
  /** `127.0.0.1:<port>`. */
  host: string;
  /** The port. */
  port: number;
  /** The registry's stderr so far (for failure messages). */
  logs(): string;
  /** Stops the process and deletes its storage. */
  stop(): Promise<void>;
}

/** Starts Debian's `docker-registry` on a free port with a temp config and storage. */
export async function startRegistry(options: StartRegistryOptions = {}): Promise<RegistryServer> {
  const dir = await Deno.makeTempDir({ prefix: "imgmkr-registry-" });
  const port = freePort();
  const lines = [
    "version: 0.1",
    "log:",
    "  level: warn",
    "  accesslog:",
    "    disabled: true",
    "storage:",
    "  filesystem:",
    `    rootdirectory: ${dir}/data`,
    "  delete:",
    "    enabled: true",
    "http:",
    `  addr: 127.0.0.1:${port}`,
    "  secret: imgmkr-test-secret",
  ];
  if (options.tls) {
    lines.push("  tls:", `    certificate: ${options.tls.cert}`, `    key: ${options.tls.key}`);
  }
  if (options.htpasswd) {
    let file = "";
    for (const [user, password] of Object.entries(options.htpasswd)) {
      file += await mustRun(["htpasswd", "-Bbn", user, password]);
    }
    await Deno.writeTextFile(`${dir}/htpasswd`, file);
    lines.push("auth:", "  htpasswd:", "    realm: imgmkr-test", `    path: ${dir}/htpasswd`);
  } else if (options.token) {
    const t = options.token;
    lines.push(
      "auth:",
      "  token:",
      `    realm: ${t.realm}`,
      `    service: ${t.service}`,
      `    issuer: ${t.issuer}`,
      `    rootcertbundle: ${t.rootCertBundle}`,
    );
  }
  await Deno.writeTextFile(`${dir}/config.yml`, lines.join("\n") + "\n");
  const child = new Deno.Command("docker-registry", {
    args: ["serve", `${dir}/config.yml`],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  let log = "";
  const decoder = new TextDecoder();
  const drained = child.stderr.pipeTo(
    new WritableStream({ write: (c) => void (log += decoder.decode(c, { stream: true })) }),
  ).catch(() => {});
  let exited = false;
  const status = child.status.then((s) => {
    exited = true;
    return s;
  });
  const stop = async () => {
    if (!exited) child.kill("SIGTERM");
    await status;
    await drained;
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  const deadline = Date.now() + START_TIMEOUT_MS;
  for (;;) {
    if (exited) {
      await stop();
      throw new Error(`docker-registry exited at start: ${log}`);
    }
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      conn.close();
      break;
    } catch {
      if (Date.now() > deadline) {
        await stop();
        throw new Error(`docker-registry did not listen on ${port}: ${log}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return { host: `127.0.0.1:${port}`, port, logs: () => log, stop };
}

// --- token server -----------------------------------------------------------

/** One request the token server answered. */
export interface TokenRequest {
  /** GET (Basic credentials) or POST (OAuth2 form). */
  method: string;
  /** The authenticated user, if any. */
  user?: string;
  /** Requested scopes. */
  scopes: string[];
  /** `grant_type` of a POST. */
  grantType?: string;
  /** HTTP status answered. */
  status: number;
}

/** Options for {@linkcode startTokenServer}. */
export interface TokenServerOptions {
  /** Users (name → password). */
  users: Record<string, string>;
  /** Refresh (identity) tokens (token → user). @default {{}} */
  refreshTokens?: Record<string, string>;
  /** Actions a user gets on a repository. @default {() => ["pull", "push"]} */
  grant?: (user: string | undefined, repository: string) => string[];
  /** Token signing key and certificate (from {@linkcode makePki}). */
  pki: TestPki;
}

/** A running token server. */
export interface TokenServer {
  /** The realm URL (`http://127.0.0.1:<port>/token`). */
  realm: string;
  /** The `service` (JWT audience). */
  service: string;
  /** The `iss` of issued tokens. */
  issuer: string;
  /** Requests answered so far. */
  requests: TokenRequest[];
  /** Stops the server. */
  stop(): Promise<void>;
}

function pemBody(pem: string): Uint8Array<ArrayBuffer> {
  const b64 = pem.replace(/-----[^-]+-----/g, "").replace(/\s+/g, "");
  return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
}

function b64url(bytes: Uint8Array): string {
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/**
 * Starts a Docker token-auth server: `GET /token` with Basic credentials and
 * `POST /token` with `grant_type=refresh_token` or `password`. Tokens are
 * ES256 JWTs whose header carries the signing certificate (`x5c`) and whose
 * `access` claim holds what {@linkcode TokenServerOptions.grant} allows.
 */
export async function startTokenServer(options: TokenServerOptions): Promise<TokenServer> {
  const key = await crypto.subtle.importKey(
    "pkcs8",
    pemBody(await Deno.readTextFile(options.pki.tokenKey)),
    { name: "ECDSA", namedCurve: "P-256" },
    false,
    ["sign"],
  );
  const x5c = btoa(String.fromCharCode(...pemBody(await Deno.readTextFile(options.pki.tokenCert))));
  const service = "imgmkr-test-registry";
  const issuer = "imgmkr-test-issuer";
  const requests: TokenRequest[] = [];
  const grant = options.grant ?? (() => ["pull", "push"]);
  const enc = new TextEncoder();
  const sign = async (user: string | undefined, scopes: string[]) => {
    const now = Math.floor(Date.now() / 1000);
    const access = scopes.flatMap((scope) => {
      const [type, name, actions] = scope.split(":");
      if (type !== "repository" || !name) return [];
      const allowed = grant(user, name);
      return [{
        type,
        name,
        actions: (actions ?? "").split(",").filter((a) => allowed.includes(a)),
      }];
    });
    const header = { typ: "JWT", alg: "ES256", x5c: [x5c] };
    const claims = {
      iss: issuer,
      sub: user ?? "",
      aud: service,
      exp: now + TOKEN_LIFETIME_S,
      nbf: now - 10,
      iat: now,
      jti: crypto.randomUUID(),
      access,
    };
    const input = `${b64url(enc.encode(JSON.stringify(header)))}.${
      b64url(enc.encode(JSON.stringify(claims)))
    }`;
    const sig = await crypto.subtle.sign(
      { name: "ECDSA", hash: "SHA-256" },
      key,
      enc.encode(input),
    );
    return `${input}.${b64url(new Uint8Array(sig))}`;
  };
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    async (req) => {
      const url = new URL(req.url);
      const entry: TokenRequest = { method: req.method, scopes: [], status: 200 };
      requests.push(entry);
      const deny = (status: number) => {
        entry.status = status;
        return Response.json({ errors: [{ code: "UNAUTHORIZED", message: "bad credentials" }] }, {
          status,
        });
      };
      let user: string | undefined;
      if (req.method === "GET") {
        entry.scopes = url.searchParams.getAll("scope");
        const auth = req.headers.get("authorization");
        if (auth) {
          const [name, ...rest] = atob(auth.replace(/^Basic /, "")).split(":");
          if (options.users[name] !== rest.join(":")) return deny(401);
          user = name;
        }
      } else if (req.method === "POST") {
        const form = new URLSearchParams(await req.text());
        entry.grantType = form.get("grant_type") ?? undefined;
        entry.scopes = (form.get("scope") ?? "").split(" ").filter(Boolean);
        if (entry.grantType === "refresh_token") {
          user = options.refreshTokens?.[form.get("refresh_token") ?? ""];
          if (!user) return deny(401);
        } else if (entry.grantType === "password") {
          const name = form.get("username") ?? "";
          if (options.users[name] !== form.get("password")) return deny(401);
          user = name;
        } else return deny(400);
      } else return deny(405);
      entry.user = user;
      const token = await sign(user, entry.scopes);
      return Response.json({
        token,
        access_token: token,
        expires_in: TOKEN_LIFETIME_S,
        issued_at: new Date().toISOString(),
      });
    },
  );
  return {
    realm: `http://127.0.0.1:${server.addr.port}/token`,
    service,
    issuer,
    requests,
    stop: () => server.shutdown(),
  };
}

// --- fault proxy ------------------------------------------------------------

/** A request seen by the fault proxy. */
export interface ProxyRequest {
  /** 1-based number of the request. */
  index: number;
  /** HTTP method. */
  method: string;
  /** Request target (path and query). */
  path: string;
  /** Request headers, names in lower case. */
  headers: Record<string, string>;
}

/** What the proxy does with a request: forward it (undefined), or inject a fault. */
export type Fault =
  /** Forward the head and this many body bytes, then close both connections. */
  | { reset: number }
  /** Answer with this status and OCI error code (the body is drained first), without forwarding. */
  | { status: number; code?: string; headers?: Record<string, string> }
  /** Forward, and add these headers to the response. */
  | { responseHeaders: Record<string, string> };

/** A running fault proxy. */
export interface FaultProxy {
  /** `127.0.0.1:<port>`. */
  host: string;
  /** Requests seen so far. */
  requests: ProxyRequest[];
  /** Stops listening and closes every connection. */
  stop(): Promise<void>;
}

/** First byte of a TLS ClientHello record. */
const TLS_HANDSHAKE = 0x16;
const CRLFCRLF = new TextEncoder().encode("\r\n\r\n");

function indexOf(hay: Uint8Array, needle: Uint8Array, from = 0): number {
  outer: for (let i = from; i <= hay.length - needle.length; i++) {
    for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  let off = 0;
  while (off < bytes.length) off += await conn.write(bytes.subarray(off));
}

/** Reads up to the end of an HTTP head; returns it and the bytes after it. */
async function readHead(conn: Deno.Conn): Promise<[Uint8Array, Uint8Array] | undefined> {
  let buf: Uint8Array = new Uint8Array(0);
  const chunk = new Uint8Array(16 * 1024);
  for (;;) {
    const end = indexOf(buf, CRLFCRLF, Math.max(0, buf.length - chunk.length - 3));
    if (end !== -1) return [buf.subarray(0, end + 4), buf.subarray(end + 4)];
    const n = await conn.read(chunk);
    if (n === null) return undefined;
    // A TLS hello (record type 0x16): refuse it, as a plain-HTTP server does.
    if (buf.length === 0 && chunk[0] === TLS_HANDSHAKE) return undefined;
    buf = concat(buf, chunk.subarray(0, n));
  }
}

/**
 * Starts an HTTP/1.1 proxy on 127.0.0.1 in front of `target` (`host:port`).
 * Each request gets its own upstream connection (`Connection: close` is
 * forced), so `decide` sees every request and a reset hits exactly one.
 */
export function startFaultProxy(
  target: number,
  decide: (req: ProxyRequest) => Fault | undefined,
): FaultProxy {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const requests: ProxyRequest[] = [];
  const open = new Set<Deno.Conn>();
  const tasks = new Set<Promise<void>>();
  const close = (c: Deno.Conn) => {
    if (!open.delete(c)) return;
    try {
      c.close();
    } catch {
      // Already closed.
    }
  };
  const enc = new TextEncoder();
  const dec = new TextDecoder();

  const handle = async (client: Deno.Conn) => {
    const got = await readHead(client);
    if (!got) return close(client);
    const [head, rest] = got;
    const lines = dec.decode(head).split("\r\n").filter((l) => l !== "");
    const [method, path] = lines[0].split(" ");
    const headers: Record<string, string> = {};
    for (const l of lines.slice(1)) {
      const colon = l.indexOf(":");
      headers[l.slice(0, colon).toLowerCase()] = l.slice(colon + 1).trim();
    }
    const req = { index: requests.length + 1, method, path, headers };
    requests.push(req);
    const fault = decide(req);
    const header = (name: string): string | undefined => headers[name];
    if (fault && "status" in fault) {
      // Drain the body so the client reads our answer rather than a broken pipe.
      const deadline = Date.now() + DRAIN_TIMEOUT_MS;
      const length = Number(header("content-length") ?? 0);
      const chunked = /chunked/i.test(header("transfer-encoding") ?? "");
      let seen = rest.length;
      let tail = rest.slice(-5);
      const buf = new Uint8Array(64 * 1024);
      const end = enc.encode("0\r\n\r\n");
      while (Date.now() < deadline && (chunked ? indexOf(tail, end) === -1 : seen < length)) {
        const n = await client.read(buf);
        if (n === null) break;
        seen += n;
        tail = concat(tail, buf.subarray(0, n)).slice(-5);
      }
      const body = method === "HEAD" ? "" : JSON.stringify({
        errors: [{
          code: fault.code ?? (fault.status === 429 ? "TOOMANYREQUESTS" : "UNKNOWN"),
          message: "injected fault",
        }],
      });
      const extra = Object.entries(fault.headers ?? {}).map(([k, v]) => `${k}: ${v}\r\n`).join("");
      await writeAll(
        client,
        enc.encode(
          `HTTP/1.1 ${fault.status} Injected\r\nContent-Type: application/json\r\n` +
            `Content-Length: ${
              enc.encode(body).length
            }\r\nConnection: close\r\n${extra}\r\n${body}`,
        ),
      );
      return close(client);
    }
    const upstream = await Deno.connect({ hostname: "127.0.0.1", port: target });
    open.add(upstream);
    const newHead = lines.filter((l) => !/^connection:/i.test(l)).join("\r\n") +
      "\r\nConnection: close\r\n\r\n";
    await writeAll(upstream, enc.encode(newHead));
    const resetAt = fault && "reset" in fault ? fault.reset : Infinity;
    const up = (async () => {
      let forwarded = 0;
      let pending = rest;
      const buf = new Uint8Array(64 * 1024);
      for (;;) {
        if (pending.length > 0) {
          if (forwarded + pending.length >= resetAt) {
            await writeAll(upstream, pending.subarray(0, resetAt - forwarded));
            close(client);
            close(upstream);
            return;
          }
          await writeAll(upstream, pending);
          forwarded += pending.length;
        }
        const n = await client.read(buf);
        if (n === null) return;
        pending = buf.subarray(0, n);
      }
    })();
    const down = (async () => {
      const buf = new Uint8Array(64 * 1024);
      let first = true;
      let pendingHead: Uint8Array = new Uint8Array(0);
      for (;;) {
        const n = await upstream.read(buf);
        if (n === null) break;
        let out: Uint8Array = buf.subarray(0, n);
        if (first && fault && "responseHeaders" in fault) {
          pendingHead = concat(pendingHead, out);
          const end = indexOf(pendingHead, CRLFCRLF);
          if (end === -1) continue;
          const extra = Object.entries(fault.responseHeaders).map(([k, v]) => `\r\n${k}: ${v}`)
            .join("");
          out = concat(
            concat(pendingHead.subarray(0, end), enc.encode(extra)),
            pendingHead.subarray(end),
          );
        }
        first = false;
        await writeAll(client, out);
      }
      close(client);
      close(upstream);
    })();
    await Promise.allSettled([up, down]);
    close(client);
    close(upstream);
  };

  const accepting = (async () => {
    try {
      for await (const conn of listener) {
        open.add(conn);
        const task: Promise<void> = handle(conn).catch(() => {}).finally(() => {
          close(conn);
          tasks.delete(task);
        });
        tasks.add(task);
      }
    } catch {
      // Listener closed.
    }
  })();

  return {
    host: `127.0.0.1:${(listener.addr as Deno.NetAddr).port}`,
    requests,
    async stop() {
      listener.close();
      for (const c of [...open]) close(c);
      await accepting;
      await Promise.allSettled([...tasks]);
    },
  };
}

// --- synthetic images -------------------------------------------------------

/** A layer of random bytes, kept in memory (tests only). */
export interface SyntheticLayer {
  /** The bytes. */
  bytes: Uint8Array;
  /** Their descriptor. */
  descriptor: Descriptor;
}

/** A minimal valid single-platform OCI image. */
export interface SyntheticImage {
  /** Layers, in order. */
  layers: SyntheticLayer[];
  /** Config blob. */
  config: Blob;
  /** Manifest blob. */
  manifest: Blob;
  /** Record for `sink.commit()`. */
  record: ImageRecord;
}

/** Random bytes of any length. */
export function randomBytes(size: number): Uint8Array {
  const out = new Uint8Array(size);
  const max = 65536; // getRandomValues limit per call
  for (let off = 0; off < size; off += max) {
    crypto.getRandomValues(out.subarray(off, Math.min(size, off + max)));
  }
  return out;
}

/** Builds an image of random layers with a minimal config and manifest. */
export function syntheticImage(
  layerSizes: number[],
  tag = "1",
  architecture = "amd64",
): SyntheticImage {
  const layers = layerSizes.map((size) => {
    const bytes = randomBytes(size);
    return { bytes, descriptor: { mediaType: MediaType.Layer, digest: sha256Digest(bytes), size } };
  });
  const config = jsonBlob(MediaType.Config, {
    architecture,
    os: "linux",
    config: {},
    rootfs: { type: "layers", diff_ids: layers.map((l) => l.descriptor.digest) },
  });
  const manifest = jsonBlob(MediaType.Manifest, {
    schemaVersion: 2,
    mediaType: MediaType.Manifest,
    config: config.descriptor,
    layers: layers.map((l) => l.descriptor),
  });
  const platform = { os: "linux", architecture };
  return {
    layers,
    config,
    manifest,
    record: {
      tag,
      name: "t/n",
      root: manifest,
      images: [{
        platform,
        manifest,
        config,
        layers: layers.map((l) => ({
          descriptor: l.descriptor,
          diffId: l.descriptor.digest,
          tarSize: l.descriptor.size,
          fileBytes: l.descriptor.size,
          fileCount: 0,
        })),
      }],
    },
  };
}

// --- assertions (no @std here) ---------------------------------------------

/** Throws when `cond` is false. */
export function assert(cond: unknown, message = "assertion failed"): asserts cond {
  if (!cond) throw new Error(message);
}

/** Deep strict equality (node:assert). */
export function assertEquals<T>(actual: T, expected: T, message?: string): void {
  nodeAssert.deepStrictEqual(actual, expected, message);
}

/** Awaits `fn`, which must reject with an instance of `cls`; returns the error. */
export async function assertRejects<E extends Error>(
  fn: () => Promise<unknown>,
  // deno-lint-ignore no-explicit-any
  cls: new (...args: any[]) => E,
): Promise<E> {
  try {
    await fn();
  } catch (err) {
    if (err instanceof cls) return err;
    throw new Error(
      `expected ${cls.name}, got ${(err as Error)?.name}: ${(err as Error)?.message}`,
      {
        cause: err,
      },
    );
  }
  throw new Error(`expected a rejection with ${cls.name}, but it resolved`);
}
