/**
 * Registry credentials and the `WWW-Authenticate` challenge flow.
 *
 * Credentials are looked up the way docker does it (explicit flags, then
 * `config.json` credential helpers / stores / `auths`, then podman's
 * `auth.json`), and turned into an `Authorization` header by answering the
 * registry's Basic or Bearer challenge. Secrets never appear in messages.
 *
 * @module
 */

import { DOCKER_HUB } from "./reference.ts";
import { RegistryError } from "./errors.ts";

/** The key docker uses for Docker Hub in `auths`, and the server URL it gives helpers. */
export const DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/";
/** docker-credential helpers put this username next to an identity (refresh) token. */
const IDENTITY_TOKEN_USERNAME = "<token>";
/** Token lifetime when the token server gives none (the token spec's default). */
const DEFAULT_TOKEN_LIFETIME_S = 60;
/** Refresh a token this long before it expires, so a request never carries a stale one. */
const TOKEN_EXPIRY_MARGIN_MS = 10_000;
/** `client_id` sent with OAuth2 refresh-token requests, as the token spec asks. */
const CLIENT_ID = "imgmkr";

/** Credentials for one registry. */
export interface Credential {
  /** User name, for Basic auth or a token request. */
  username?: string;
  /** Password or personal access token. */
  password?: string;
  /** Identity (refresh) token from `docker login`, exchanged by OAuth2 POST. */
  identityToken?: string;
  /** Where the credential came from, for messages (never the secret), e.g. `--username`. */
  source: string;
}

/** Options for {@linkcode findCredential}. */
export interface FindCredentialOptions {
  /**
   * Reads an environment variable (`DOCKER_CONFIG`, `HOME`, `PATH`, `XDG_RUNTIME_DIR`,
   * `XDG_CONFIG_HOME`, `REGISTRY_AUTH_FILE`).
   * @default {(name) => Deno.env.get(name)}
   */
  env?: (name: string) => string | undefined;
}

/** Keys under which an `auths` entry or helper may hold credentials for `registry`. */
function authKeys(registry: string): string[] {
  if (registry === DOCKER_HUB) {
    return [DOCKER_HUB_AUTH_KEY, "docker.io", "index.docker.io", "registry-1.docker.io"];
  }
  return [registry];
}

/** docker's `ConvertToHostname`: drops the scheme and any path. */
function keyHost(key: string): string {
  return key.replace(/^https?:\/\//, "").split("/")[0];
}

interface AuthEntry {
  auth?: string;
  username?: string;
  password?: string;
  identitytoken?: string;
}

interface AuthFile {
  auths?: Record<string, AuthEntry>;
  credHelpers?: Record<string, string>;
  credsStore?: string;
}

async function readAuthFile(path: string): Promise<AuthFile | undefined> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound || err instanceof Deno.errors.PermissionDenied) {
      return undefined;
    }
    throw err;
  }
  try {
    const parsed = JSON.parse(text);
    return typeof parsed === "object" && parsed !== null ? parsed as AuthFile : undefined;
  } catch (err) {
    throw new SyntaxError(`Cannot parse ${path}: ${(err as Error).message}`, { cause: err });
  }
}

function entryCredential(entry: AuthEntry, source: string): Credential | undefined {
  if (entry.identitytoken) {
    const username = entry.auth ? decodeBasic(entry.auth, source).username : entry.username;
    return { username, identityToken: entry.identitytoken, source };
  }
  if (entry.auth) return { ...decodeBasic(entry.auth, source), source };
  if (entry.username && entry.password !== undefined) {
    return { username: entry.username, password: entry.password, source };
  }
  return undefined;
}

function decodeBasic(auth: string, source: string): { username: string; password: string } {
  let text: string;
  try {
    text = new TextDecoder().decode(Uint8Array.from(atob(auth), (c) => c.charCodeAt(0)));
  } catch {
    throw new SyntaxError(`Cannot decode an 'auth' entry in ${source}: it is not base64`);
  }
  const colon = text.indexOf(":");
  if (colon === -1) {
    throw new SyntaxError(`Cannot decode an 'auth' entry in ${source}: expected user:password`);
  }
  return { username: text.slice(0, colon), password: text.slice(colon + 1) };
}

/**
 * Finds the `auths` entry for a registry. Keys may carry a scheme and path
 * (`https://host/v1/`); podman-style keys with a repository path
 * (`host/org`) only match that repository, the longest one winning.
 */
function findEntry(
  auths: Record<string, AuthEntry>,
  registry: string,
  repository: string,
): AuthEntry | undefined {
  const hosts = new Set(authKeys(registry).map(keyHost));
  let best: { entry: AuthEntry; length: number } | undefined;
  for (const [key, entry] of Object.entries(auths)) {
    const bare = key.replace(/^https?:\/\//, "").replace(/\/+$/, "");
    let length = -1;
    if (hosts.has(keyHost(key)) && (/^https?:\/\//.test(key) || !bare.includes("/"))) length = 0;
    else {
      const slash = bare.indexOf("/");
      const host = bare.slice(0, slash);
      const path = bare.slice(slash + 1);
      if (
        slash > 0 && hosts.has(host) && (repository === path || repository.startsWith(`${path}/`))
      ) length = path.length;
    }
    if (length >= 0 && (!best || length > best.length)) best = { entry, length };
  }
  return best?.entry;
}

/** Finds an executable on a `PATH`. */
async function which(name: string, path: string | undefined): Promise<string | undefined> {
  for (const dir of (path ?? "").split(":")) {
    if (!dir) continue;
    const file = `${dir}/${name}`;
    try {
      const info = await Deno.stat(file);
      if (info.isFile && (info.mode === null || (info.mode & 0o111) !== 0)) return file;
    } catch {
      // Not in this directory.
    }
  }
  return undefined;
}

/**
 * Runs `docker-credential-<helper> get` for a server URL.
 * @returns undefined when the helper has no credentials for it.
 * @throws {Error} when the helper is missing or fails otherwise.
 */
async function runHelper(
  helper: string,
  serverUrl: string,
  configPath: string,
  env: (name: string) => string | undefined,
): Promise<Credential | undefined> {
  const name = `docker-credential-${helper}`;
  const exe = await which(name, env("PATH"));
  if (!exe) {
    throw new Error(
      `Cannot run ${name} (named in ${configPath}): it is not on PATH; install it or remove it from that file`,
    );
  }
  const child = new Deno.Command(exe, {
    args: ["get"],
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const w = child.stdin.getWriter();
  await w.write(new TextEncoder().encode(serverUrl));
  await w.close();
  const out = await child.output();
  const stdout = new TextDecoder().decode(out.stdout).trim();
  if (!out.success) {
    const said = `${stdout}\n${new TextDecoder().decode(out.stderr)}`;
    if (/credentials not found/i.test(said)) return undefined;
    const firstLine = said.trim().split("\n")[0].slice(0, 200);
    throw new Error(`${name} get failed with exit code ${out.code}: ${firstLine}`);
  }
  let parsed: { Username?: string; Secret?: string };
  try {
    parsed = JSON.parse(stdout);
  } catch {
    throw new SyntaxError(`${name} get printed something that is not JSON`);
  }
  if (!parsed.Secret) return undefined;
  const source = `credential helper ${name}`;
  if (parsed.Username === IDENTITY_TOKEN_USERNAME) return { identityToken: parsed.Secret, source };
  return { username: parsed.Username ?? "", password: parsed.Secret, source };
}

/** Looks a registry up in one docker-format file: helper, then store, then `auths`. */
async function fromAuthFile(
  path: string,
  registry: string,
  repository: string,
  env: (name: string) => string | undefined,
): Promise<Credential | undefined> {
  const file = await readAuthFile(path);
  if (!file) return undefined;
  const keys = authKeys(registry);
  const helperKey = keys.find((k) => file.credHelpers?.[k]);
  if (helperKey) {
    const cred = await runHelper(file.credHelpers![helperKey], keys[0], path, env);
    if (cred) return cred;
  } else if (file.credsStore) {
    const cred = await runHelper(file.credsStore, keys[0], path, env);
    if (cred) return cred;
  }
  const entry = file.auths && findEntry(file.auths, registry, repository);
  return entry && entryCredential(entry, path);
}

/**
 * Finds stored credentials for a registry, in docker's order:
 * `$DOCKER_CONFIG/config.json` (else `~/.docker/config.json`), where a
 * `credHelpers` entry, then `credsStore`, then the `auths` entry is used;
 * then podman's `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`
 * and `$XDG_CONFIG_HOME/containers/auth.json` (same format). Explicit
 * `--username` credentials are the caller's and take precedence over all.
 *
 * @param registry the registry as in a {@linkcode Reference} (`docker.io` for Hub).
 * @param repository the repository, for podman keys that name one (`quay.io/org`).
 * @returns undefined when nothing is stored for the registry.
 * @throws {Error} when a named credential helper is missing or fails.
 * @throws {SyntaxError} when a file cannot be parsed.
 */
export async function findCredential(
  registry: string,
  repository = "",
  options: FindCredentialOptions = {},
): Promise<Credential | undefined> {
  const env = options.env ?? ((name: string) => Deno.env.get(name));
  const home = env("HOME");
  const files: string[] = [];
  const dockerConfig = env("DOCKER_CONFIG");
  if (dockerConfig) files.push(`${dockerConfig}/config.json`);
  else if (home) files.push(`${home}/.docker/config.json`);
  const authFile = env("REGISTRY_AUTH_FILE");
  if (authFile) files.push(authFile);
  const runtime = env("XDG_RUNTIME_DIR");
  if (runtime) files.push(`${runtime}/containers/auth.json`);
  const configHome = env("XDG_CONFIG_HOME") ?? (home ? `${home}/.config` : undefined);
  if (configHome) files.push(`${configHome}/containers/auth.json`);
  for (const file of files) {
    const cred = await fromAuthFile(file, registry, repository, env);
    if (cred) return cred;
  }
  return undefined;
}

/** One challenge of a `WWW-Authenticate` header. */
export interface Challenge {
  /** Lower-case scheme, e.g. `bearer` or `basic`. */
  scheme: string;
  /** Parameters with lower-case names, e.g. `realm`, `service`, `scope`, `error`. */
  params: Record<string, string>;
}

/**
 * Parses a `WWW-Authenticate` header (RFC 9110): several challenges separated
 * by commas, and quoted values that contain commas or escaped quotes (token68 is ignored).
 *
 * @example `Bearer realm="https://auth.io/token",service="reg",scope="repository:a:pull,push"`
 */
export function parseWwwAuthenticate(header: string): Challenge[] {
  const challenges: Challenge[] = [];
  let i = 0;
  const n = header.length;
  const skipSpace = () => {
    while (i < n && /[\s]/.test(header[i])) i++;
  };
  const token = (): string => {
    const start = i;
    while (i < n && /[!#$%&'*+.^_`|~0-9A-Za-z-]/.test(header[i])) i++;
    return header.slice(start, i);
  };
  while (i < n) {
    skipSpace();
    if (header[i] === ",") {
      i++;
      continue;
    }
    const scheme = token();
    if (!scheme) {
      i++; // Skip a character that cannot start a challenge.
      continue;
    }
    const challenge: Challenge = { scheme: scheme.toLowerCase(), params: {} };
    challenges.push(challenge);
    // Parameters: name=value pairs separated by commas, until the next scheme.
    for (;;) {
      skipSpace();
      const save = i;
      const name = token();
      skipSpace();
      if (!name || header[i] !== "=") {
        // Not a parameter: the next challenge's scheme (or an unsupported token68).
        i = save;
        break;
      }
      i++; // '='
      skipSpace();
      let value = "";
      if (header[i] === '"') {
        i++;
        while (i < n && header[i] !== '"') {
          if (header[i] === "\\" && i + 1 < n) i++;
          value += header[i++];
        }
        i++; // closing quote
      } else {
        const start = i;
        while (i < n && header[i] !== "," && !/\s/.test(header[i])) i++;
        value = header.slice(start, i);
      }
      challenge.params[name.toLowerCase()] = value;
      skipSpace();
      if (header[i] === ",") i++;
      else break;
    }
  }
  return challenges;
}

/** `Basic <base64(user:password)>`, UTF-8 encoded. */
export function basicAuthorization(username: string, password: string): string {
  const bytes = new TextEncoder().encode(`${username}:${password}`);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return `Basic ${btoa(bin)}`;
}

/** Options for {@linkcode Authenticator}. */
export interface AuthenticatorOptions {
  /** The registry as in a reference (`docker.io` for Hub), for lookups and messages. */
  registry: string;
  /** The repository, e.g. `t/n`; the token scope is `repository:<repository>:pull,push`. */
  repository: string;
  /**
   * Explicit credentials (`--username` + `--password-stdin`); skips the lookup.
   * @default {undefined}
   */
  credential?: Credential;
  /**
   * Looks up stored credentials when a challenge needs them.
   * @default {findCredential}
   */
  lookup?: (registry: string, repository: string) => Promise<Credential | undefined>;
  /**
   * Sends a token request (the registry client passes its TLS client, logging and retries).
   * @default {fetch}
   */
  fetch?: (url: string, init: RequestInit) => Promise<Response>;
}

/** The `docker login` hint for a registry. */
export function loginHint(registry: string): string {
  return registry === DOCKER_HUB
    ? "run `docker login` or pass --username"
    : `run \`docker login ${registry}\` or pass --username`;
}

/** Removes the query string of a URL, for messages. */
function withoutQuery(url: string): string {
  const u = new URL(url);
  u.username = "";
  u.password = "";
  u.search = "";
  return u.href;
}

/**
 * Answers registry challenges for one repository and caches the result.
 * Bearer tokens are fetched once per scope, shared by concurrent requests,
 * and refreshed before they expire or when the registry rejects them.
 */
export class Authenticator {
  /** The token scope requested. */
  readonly scope: string;
  readonly #registry: string;
  readonly #explicit?: Credential;
  readonly #lookup: (registry: string, repository: string) => Promise<Credential | undefined>;
  readonly #fetch: (url: string, init: RequestInit) => Promise<Response>;
  readonly #repository: string;
  #credential?: Promise<Credential | undefined>;
  #header?: string;
  #expires = Infinity;
  #pending?: Promise<void>;
  #generation = 0;
  #challenge?: Challenge;

  /** Creates an authenticator; nothing is looked up until a challenge arrives. */
  constructor(options: AuthenticatorOptions) {
    this.#registry = options.registry;
    this.#repository = options.repository;
    this.#explicit = options.credential;
    this.#lookup = options.lookup ?? ((r, repo) => findCredential(r, repo));
    this.#fetch = options.fetch ?? ((url, init) => fetch(url, init));
    this.scope = `repository:${options.repository}:pull,push`;
  }

  /** Bumped whenever a new header is obtained; lets a request tell whether to re-authenticate. */
  get generation(): number {
    return this.#generation;
  }

  /** The `Authorization` header to send, if any (undefined when it has expired). */
  authorization(): string | undefined {
    if (this.#header && Date.now() >= this.#expires) {
      this.#header = undefined;
      // Trigger a refresh on next challenge; callers re-authenticate on 401.
    }
    return this.#header;
  }

  /** True when a challenge was seen and a fresh header can be fetched before sending. */
  get needsRefresh(): boolean {
    return this.#challenge !== undefined && this.#header === undefined;
  }

  /** The credential in use (looked up once), for messages: its source and username only. */
  credential(): Promise<Credential | undefined> {
    this.#credential ??= this.#explicit
      ? Promise.resolve(this.#explicit)
      : this.#lookup(this.#registry, this.#repository);
    return this.#credential;
  }

  /** Re-answers the last challenge (e.g. when a cached token expired). */
  refresh(): Promise<void> {
    if (!this.#challenge) return Promise.resolve();
    return this.#answer(this.#challenge, this.#generation);
  }

  /**
   * Answers a `WWW-Authenticate` header from a 401.
   * @param seenGeneration the {@linkcode generation} the rejected request was sent with;
   *   if a newer header exists already, this returns at once.
   * @throws {RegistryError} when no credentials exist for a Basic challenge or the
   *   token server refuses them.
   */
  async authenticate(header: string | null, seenGeneration: number): Promise<void> {
    const challenges = parseWwwAuthenticate(header ?? "");
    const challenge = challenges.find((c) => c.scheme === "bearer") ??
      challenges.find((c) => c.scheme === "basic");
    if (!challenge) {
      throw new TypeError(
        `Cannot authenticate to ${this.#registry}: unsupported challenge '${
          (header ?? "").split(" ")[0] || "(none)"
        }'; only Basic and Bearer are supported`,
      );
    }
    this.#challenge = challenge;
    await this.#answer(challenge, seenGeneration);
  }

  #answer(challenge: Challenge, seenGeneration: number): Promise<void> {
    if (this.#generation > seenGeneration && this.#header) return Promise.resolve();
    this.#pending ??= (async () => {
      try {
        const { header, expires } = challenge.scheme === "basic"
          ? await this.#basic()
          : await this.#bearer(challenge);
        this.#header = header;
        this.#expires = expires;
        this.#generation++;
      } finally {
        this.#pending = undefined;
      }
    })();
    return this.#pending;
  }

  async #basic(): Promise<{ header: string; expires: number }> {
    const cred = await this.credential();
    if (!cred || cred.password === undefined || cred.username === undefined) {
      throw new RegistryError(
        `401 UNAUTHORIZED from ${this.#registry}: the registry asks for a user name and password and ${
          cred ? `${cred.source} has only an identity token` : "none were found"
        }; ${loginHint(this.#registry)}`,
        { status: 401, code: "UNAUTHORIZED", method: "GET", url: this.#registry },
      );
    }
    return { header: basicAuthorization(cred.username, cred.password), expires: Infinity };
  }

  async #bearer(challenge: Challenge): Promise<{ header: string; expires: number }> {
    const realm = challenge.params.realm;
    if (!realm) {
      throw new TypeError(
        `Cannot authenticate to ${this.#registry}: Bearer challenge has no realm`,
      );
    }
    const cred = await this.credential();
    const service = challenge.params.service;
    const url = new URL(realm);
    let init: RequestInit;
    if (cred?.identityToken) {
      const form = new URLSearchParams({
        grant_type: "refresh_token",
        refresh_token: cred.identityToken,
        client_id: CLIENT_ID,
        scope: this.scope,
      });
      if (service) form.set("service", service);
      init = {
        method: "POST",
        headers: { "Content-Type": "application/x-www-form-urlencoded" },
        body: form.toString(),
      };
    } else {
      if (service) url.searchParams.set("service", service);
      url.searchParams.set("scope", this.scope);
      const headers: Record<string, string> = {};
      if (cred?.username !== undefined && cred.password !== undefined) {
        headers.Authorization = basicAuthorization(cred.username, cred.password);
        url.searchParams.set("account", cred.username);
      }
      init = { method: "GET", headers };
    }
    const res = await this.#fetch(url.href, init);
    const text = await res.text();
    if (!res.ok) {
      const who = cred
        ? `${
          cred.username ? `user '${cred.username}'` : "the identity token"
        } (from ${cred.source})`
        : "anonymous access (no credentials found)";
      throw new RegistryError(
        `${res.status} ${
          res.status === 401 ? "UNAUTHORIZED" : res.status === 403 ? "DENIED" : res.statusText
        } from ${init.method} ${
          withoutQuery(url.href)
        }: the token server refused ${who} for scope ${this.scope}; ${loginHint(this.#registry)}`,
        { status: res.status, method: init.method!, url: withoutQuery(url.href) },
      );
    }
    let body: { token?: string; access_token?: string; expires_in?: number };
    try {
      body = JSON.parse(text);
    } catch {
      throw new SyntaxError(`Token server ${withoutQuery(url.href)} answered with invalid JSON`);
    }
    const token = body.token ?? body.access_token;
    if (!token) {
      throw new SyntaxError(`Token server ${withoutQuery(url.href)} answered without a token`);
    }
    const lifetime = (body.expires_in ?? DEFAULT_TOKEN_LIFETIME_S) * 1000;
    return {
      header: `Bearer ${token}`,
      expires: Date.now() + Math.max(lifetime - TOKEN_EXPIRY_MARGIN_MS, lifetime / 2),
    };
  }

  /**
   * Explains a 401/403 that persists after authenticating: the message names
   * the credential source (never the secret) and how to fix it.
   */
  async describeRejection(status: number, header: string | null): Promise<string> {
    const cred = await this.credential();
    const challenge = parseWwwAuthenticate(header ?? "")[0];
    const who = cred
      ? `${cred.username ? `user '${cred.username}'` : "the identity token"} (from ${cred.source})`
      : undefined;
    if (challenge?.params.error === "insufficient_scope" || status === 403) {
      return who
        ? `${who} may not push to ${this.#repository} (scope ${this.scope} was not granted); check the account's permissions or ${
          loginHint(this.#registry)
        } with an account that may push`
        : `no credentials were found for ${this.#registry} and anonymous access cannot push; ${
          loginHint(this.#registry)
        }`;
    }
    return who
      ? `the registry rejected ${who}; ${loginHint(this.#registry)}`
      : `authentication required and no credentials were found for ${this.#registry}; ${
        loginHint(this.#registry)
      }`;
  }
}
