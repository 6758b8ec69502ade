/**
 * Native push over the OCI distribution API: an {@linkcode ImageSink} that
 * streams blobs to a registry (one streamed PATCH, or chunked PATCHes),
 * answers auth challenges, retries transient failures, and reports stats.
 *
 * Retries happen at two levels. Requests whose body is in memory (HEAD, POST,
 * PUT, a chunk of a chunked upload) are retried in place. A streamed blob
 * cannot be replayed, so when its upload breaks mid-way `write()`/`commit()`
 * throw a {@linkcode RetryableBlobError}; the caller regenerates the
 * (deterministic) content and uploads it again, which
 * {@linkcode pushBlobWithRetry} does.
 *
 * @module
 */

import { RegistryError } from "./errors.ts";
import { type Reference, registryEndpoint } from "./reference.ts";
import type {
  Blob,
  BlobWriter,
  CreateBlobOptions,
  Descriptor,
  ImageRecord,
  ImageSink,
} from "./oci.ts";
import { MediaType } from "./oci.ts";
import { Authenticator, type Credential, findCredential } from "./auth.ts";

/** Default number of retries per request and per streamed blob (`--retries`). */
export const DEFAULT_RETRIES = 3;
/** First backoff delay; doubled per attempt. Small, as most faults are brief. */
export const RETRY_BASE_MS = 250;
/** Longest backoff delay, so a flaky registry costs seconds, not minutes. */
export const RETRY_MAX_MS = 8_000;
/** Longest `Retry-After` honoured; a registry asking for more is treated as this. */
export const RETRY_AFTER_MAX_MS = 60_000;
/**
 * How long the HTTPS probe of a loopback registry may take before plain HTTP
 * is tried: a plain-HTTP server that never answers a TLS hello would
 * otherwise hang the push.
 */
export const LOOPBACK_TLS_PROBE_MS = 3_000;
/** What an HTTPS server (Go's net/http among them) answers a plain-HTTP request with. */
const HTTP_TO_HTTPS_STATUS = 400;
/** Error bodies are read up to this many characters, for the OCI error code. */
const ERROR_BODY_LIMIT = 4096;

/** Media types that are PUT to `/manifests/` rather than `/blobs/`. */
const MANIFEST_TYPES: ReadonlySet<string> = new Set([
  MediaType.Manifest,
  MediaType.Index,
  "application/vnd.docker.distribution.manifest.v2+json",
  "application/vnd.docker.distribution.manifest.list.v2+json",
]);

/** Options for {@linkcode createRegistrySink}. */
export interface RegistrySinkOptions {
  /** Where to push: registry, repository and tag. */
  reference: Reference;
  /**
   * Explicit credentials (`--username` + `--password-stdin`); otherwise they are
   * looked up with {@linkcode findCredential} when the registry asks.
   * @default {undefined}
   */
  credential?: Credential;
  /**
   * Looks up stored credentials (tests point it at a temp `DOCKER_CONFIG`).
   * @default {findCredential}
   */
  lookupCredential?: (registry: string, repository: string) => Promise<Credential | undefined>;
  /**
   * Use plain HTTP (`--plain-http`). Without it HTTPS is used, except that for
   * `localhost`, `127.0.0.0/8` and `::1` HTTPS is tried first and plain HTTP
   * is used if the TLS connection fails (as docker does for those hosts).
   * @default {false}
   */
  plainHttp?: boolean;
  /**
   * PEM file of a CA to trust (`--ca-cert`); HTTPS is then always used.
   * @default {undefined}
   */
  caCert?: string;
  /**
   * Upload in chunks of this many bytes (`--chunk-size`) instead of one streamed PATCH.
   * Raised to the registry's `OCI-Chunk-Min-Length` when that is larger.
   * @default {undefined}
   */
  chunkSize?: number;
  /**
   * Retries per request, and per streamed blob in {@linkcode pushBlobWithRetry} (`--retries`).
   * @default {DEFAULT_RETRIES}
   */
  retries?: number;
  /**
   * First backoff delay in ms (tests shorten it).
   * @default {RETRY_BASE_MS}
   */
  retryBaseMs?: number;
  /**
   * Longest backoff delay in ms.
   * @default {RETRY_MAX_MS}
   */
  retryMaxMs?: number;
  /**
   * Receives one line per HTTP request (`--verbose`): method, URL without query
   * or credentials, status and time. Authorization values are never included.
   * @default {undefined}
   */
  log?: (line: string) => void;
}

/** Upload stats of one blob. */
export interface BlobStats {
  /** The blob's digest. */
  digest: string;
  /** Its media type. */
  mediaType: string;
  /** Its size in bytes. */
  size: number;
  /** Seconds from starting the upload session to the committing PUT's answer. */
  seconds: number;
  /** Upload rate in MB/s (10^6 bytes). */
  mbPerSecond: number;
}

/** Stats of a push, for `--json`. */
export interface PushStats {
  /** Bytes of the blobs and manifests this push uploaded (each counted once). */
  bytesUploaded: number;
  /** Bytes sent, including attempts that failed and were retried. */
  bytesSent: number;
  /** Blobs and manifests found on the registry already (a `has()` that said true). */
  blobsSkipped: number;
  /** Blobs and manifests uploaded. */
  blobsUploaded: number;
  /** Requests retried in place plus streamed blobs regenerated. */
  retries: number;
  /** Per-blob stats of the streamed blobs, in commit order. */
  blobs: BlobStats[];
}

/** The registry {@linkcode ImageSink}, with its stats. */
export interface RegistrySink extends ImageSink {
  /** Counters for `--json`, updated as the push goes. */
  readonly stats: PushStats;
  /** The retry budget ({@linkcode RegistrySinkOptions.retries}). */
  readonly retries: number;
  /** `<registry>/<repository>@sha256:…` once {@linkcode ImageSink.commit} succeeded. */
  readonly digestReference?: string;
  /** Releases the HTTP client; done by `commit()` and `abort()`, safe to repeat. */
  close(): void;
}

/**
 * A streamed blob upload broke in a way that only re-sending the whole blob
 * can fix (connection reset, 5xx or 408/429 on a streamed PATCH, the upload
 * session lost). Regenerate the content and call `createBlob()` again.
 */
export class RetryableBlobError extends Error {
  /** The underlying failure, which is thrown once retries run out. */
  override readonly cause: RegistryError;
  /** How long the registry asked to wait (`Retry-After`), if it did. */
  readonly retryAfterMs?: number;
  /** Wraps the failure of one upload attempt. */
  constructor(cause: RegistryError, retryAfterMs?: number) {
    super(`Upload interrupted, the blob can be sent again: ${cause.message}`, { cause });
    this.name = "RetryableBlobError";
    this.cause = cause;
    this.retryAfterMs = retryAfterMs;
  }
}

/** A regenerated blob's digest or size differs from what it was expected to be. */
export class BlobMismatchError extends Error {
  /** Builds the error; the message names both descriptors. */
  constructor(message: string) {
    super(message);
    this.name = "BlobMismatchError";
  }
}

/** True when `err` means "regenerate this blob and upload it again". */
export function isRetryableBlobError(err: unknown): err is RetryableBlobError {
  return err instanceof RetryableBlobError;
}

/** Options for {@linkcode retryDelay}. */
export interface RetryDelayOptions {
  /**
   * First delay in ms.
   * @default {RETRY_BASE_MS}
   */
  baseMs?: number;
  /**
   * Cap in ms.
   * @default {RETRY_MAX_MS}
   */
  maxMs?: number;
}

/** Capped exponential backoff with jitter: about `base * 2^attempt`, at most `max` (attempt ≥ 0). */
export function retryDelay(attempt: number, options: RetryDelayOptions = {}): number {
  const base = options.baseMs ?? RETRY_BASE_MS;
  const max = options.maxMs ?? RETRY_MAX_MS;
  const full = Math.min(max, base * 2 ** attempt);
  return Math.round(full / 2 + Math.random() * full / 2);
}

/** Parses `Retry-After` (seconds or an HTTP date) into ms, capped at {@linkcode RETRY_AFTER_MAX_MS}. */
export function parseRetryAfter(value: string | null): number | undefined {
  if (!value) return undefined;
  const seconds = Number(value.trim());
  const ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(value) - Date.now();
  if (!Number.isFinite(ms)) return undefined;
  return Math.min(RETRY_AFTER_MAX_MS, Math.max(0, ms));
}

/** True for hosts docker lets talk plain HTTP: `localhost`, `127.0.0.0/8`, `::1`. */
export function isLoopbackHost(host: string): boolean {
  const name = host.startsWith("[") ? host.slice(1, host.indexOf("]")) : host.split(":")[0];
  return name === "localhost" || name === "::1" || /^127\.\d{1,3}\.\d{1,3}\.\d{1,3}$/.test(name);
}

/** Options for {@linkcode pushBlobWithRetry}. */
export interface PushBlobOptions {
  /** Media type of the blob. */
  mediaType: string;
  /**
   * Exact size when known in advance.
   * @default {undefined}
   */
  size?: number;
  /**
   * The descriptor the content must have, when known (e.g. from an earlier run).
   * If the registry has it already nothing is produced; otherwise every attempt must match it.
   * @default {undefined}
   */
  expected?: Descriptor;
  /**
   * How many times the blob is regenerated after a {@linkcode RetryableBlobError}.
   * @default {the sink's `retries`, else DEFAULT_RETRIES}
   */
  retries?: number;
  /**
   * Backoff between attempts.
   * @default {{}}
   */
  delay?: RetryDelayOptions;
  /**
   * Called when the registry has `expected` already, so nothing is produced.
   * @default {undefined}
   */
  onSkipped?: () => void;
  /**
   * Called before each retry with the attempt number (1-based) and the failure.
   * @default {undefined}
   */
  onRetry?: (attempt: number, err: RetryableBlobError) => void;
}

/**
 * Uploads one streamed blob, regenerating it when the upload breaks.
 *
 * `produce` writes the whole blob to the writer it is given and returns its
 * descriptor; it is called again from the start for each retry and must
 * produce identical bytes (imgmkr's content is deterministic from the seed).
 * Every attempt that finishes must return the same digest and size as the
 * first one that finished (and as `expected`); a mismatch throws an `Error`
 * at once. The registry checks the bytes against the digest on commit.
 *
 * @returns the blob's descriptor.
 * @throws {RegistryError} when the upload still fails after `retries` regenerations,
 *   or fails in a way that retrying cannot fix.
 */
export async function pushBlobWithRetry(
  sink: ImageSink,
  produce: (writer: BlobWriter, attempt: number) => Promise<Descriptor>,
  options: PushBlobOptions,
): Promise<Descriptor> {
  const retries = options.retries ?? (sink as Partial<RegistrySink>).retries ?? DEFAULT_RETRIES;
  let known = options.expected;
  if (known && await sink.has(known)) {
    options.onSkipped?.();
    return known;
  }
  for (let attempt = 0;; attempt++) {
    const writer = await sink.createBlob({ mediaType: options.mediaType, size: options.size });
    try {
      const desc = await produce(writer, attempt);
      if (known && (desc.digest !== known.digest || desc.size !== known.size)) {
        throw new BlobMismatchError(
          `Regenerated blob differs from the first attempt: ${desc.digest} (${desc.size} bytes) instead of ${known.digest} (${known.size} bytes); the content is not deterministic`,
        );
      }
      known = desc;
      await writer.commit(desc);
      return desc;
    } catch (err) {
      await writer.abort();
      if (!isRetryableBlobError(err)) throw err;
      if (attempt >= retries) {
        const c = err.cause;
        throw new RegistryError(`${c.message} (gave up after ${retries} retries)`, {
          status: c.status,
          code: c.code,
          method: c.method,
          url: c.url,
          cause: c,
        });
      }
      options.onRetry?.(attempt + 1, err);
      const stats = (sink as Partial<RegistrySink>).stats;
      if (stats) stats.retries++;
      await sleep(err.retryAfterMs ?? retryDelay(attempt, options.delay));
    }
  }
}

/** Creates the sink that pushes to `options.reference`'s registry. */
export function createRegistrySink(options: RegistrySinkOptions): RegistrySink {
  return new Registry(options);
}

// ---------------------------------------------------------------------------

interface RequestOptions {
  headers?: Record<string, string>;
  body?: Uint8Array;
  /** Statuses that count as success; anything else throws. */
  expect: number[];
  /** In-place retries for this request. */
  retries?: number;
  /** Gives up on a request that has not answered after this many ms. */
  timeoutMs?: number;
}

/** Failures that a retry may fix: no response, 408, 429, 5xx except "not implemented". */
function isTransientStatus(status: number): boolean {
  return status === 0 || status === 408 || status === 429 ||
    (status >= 500 && status !== 501 && status !== 505);
}

/** The URL without credentials or query (upload URLs may carry signed state). */
function cleanUrl(url: string): string {
  try {
    const u = new URL(url);
    u.username = "";
    u.password = "";
    const digest = u.searchParams.get("digest");
    u.search = digest ? `?digest=${digest}` : "";
    return u.href;
  } catch {
    return "(invalid URL)";
  }
}

const STATUS_WORDS: Record<number, string> = {
  400: "BAD_REQUEST",
  401: "UNAUTHORIZED",
  403: "DENIED",
  404: "NOT_FOUND",
  405: "UNSUPPORTED",
  408: "REQUEST_TIMEOUT",
  413: "PAYLOAD_TOO_LARGE",
  416: "RANGE_NOT_SATISFIABLE",
  429: "TOOMANYREQUESTS",
  500: "INTERNAL_SERVER_ERROR",
  502: "BAD_GATEWAY",
  503: "SERVICE_UNAVAILABLE",
  504: "GATEWAY_TIMEOUT",
};

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted || ms <= 0) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
  });
}

/** Retry-After of a transient failure, kept next to the error without a custom class. */
const retryAfterOf = new WeakMap<RegistryError, number>();

/** Appends `digest=` to an upload URL, with `&` when it has a query already. */
function withDigest(location: string, digest: string): string {
  return `${location}${location.includes("?") ? "&" : "?"}digest=${encodeURIComponent(digest)}`;
}

/** The last byte offset of a `Range: 0-<end>` header (with or without `bytes=`), or -1. */
function rangeEnd(value: string | null): number {
  const m = /^(?:bytes=)?0-(\d+)$/.exec(value?.trim() ?? "");
  return m ? Number(m[1]) : -1;
}

class Registry implements RegistrySink {
  readonly name: string;
  readonly stats: PushStats = {
    bytesUploaded: 0,
    bytesSent: 0,
    blobsSkipped: 0,
    blobsUploaded: 0,
    retries: 0,
    blobs: [],
  };
  readonly retries: number;
  digestReference?: string;
  readonly #ref: Reference;
  readonly #host: string;
  readonly #options: RegistrySinkOptions;
  readonly #client: Deno.HttpClient;
  readonly #auth: Authenticator;
  readonly #abort = new AbortController();
  readonly #writers = new Set<Upload>();
  readonly #delay: RetryDelayOptions;
  #base?: Promise<string>;
  #closed = false;

  constructor(options: RegistrySinkOptions) {
    this.#options = options;
    this.#ref = options.reference;
    this.#host = registryEndpoint(options.reference.registry);
    this.name =
      `${options.reference.registry}/${options.reference.repository}:${options.reference.tag}`;
    this.retries = options.retries ?? DEFAULT_RETRIES;
    if (!Number.isInteger(this.retries) || this.retries < 0) {
      throw new RangeError(`Cannot use --retries ${this.retries}: it must be a whole number ≥ 0`);
    }
    if (options.chunkSize !== undefined && !(options.chunkSize >= 1)) {
      throw new RangeError(
        `Cannot use --chunk-size ${options.chunkSize}: it must be at least 1 byte`,
      );
    }
    this.#delay = { baseMs: options.retryBaseMs, maxMs: options.retryMaxMs };
    let caCerts: string[] | undefined;
    if (options.caCert) {
      try {
        caCerts = [Deno.readTextFileSync(options.caCert)];
      } catch (err) {
        throw new TypeError(
          `Cannot read --ca-cert file '${options.caCert}': ${(err as Error).message}`,
          {
            cause: err,
          },
        );
      }
    }
    this.#client = Deno.createHttpClient(caCerts ? { caCerts } : {});
    this.#auth = new Authenticator({
      registry: options.reference.registry,
      repository: options.reference.repository,
      credential: options.credential,
      lookup: options.lookupCredential ?? ((r, repo) => findCredential(r, repo)),
      fetch: (url, init) => this.#fetch(init.method ?? "GET", url, init, false),
    });
  }

  // -- HTTP ------------------------------------------------------------------

  /** One fetch with the sink's client and abort signal, logged. */
  async #fetch(
    method: string,
    url: string,
    init: RequestInit & { duplex?: "half" },
    authorized: boolean,
  ): Promise<Response> {
    const start = performance.now();
    const note = authorized ? " [Authorization redacted]" : "";
    try {
      const res = await fetch(url, {
        ...init,
        method,
        signal: init.signal ?? this.#abort.signal,
        client: this.#client,
      } as RequestInit);
      this.#options.log?.(
        `${method} ${cleanUrl(url)} ${res.status} (${
          Math.round(performance.now() - start)
        } ms)${note}`,
      );
      return res;
    } catch (err) {
      this.#options.log?.(
        `${method} ${cleanUrl(url)} failed: ${(err as Error).message} (${
          Math.round(performance.now() - start)
        } ms)${note}`,
      );
      throw err;
    }
  }

  /** The failure of a request that got no response. */
  #networkError(method: string, url: string, err: unknown): RegistryError {
    // fetch says only "fetch failed"; the reason (refused, TLS, reset) is in its cause.
    const cause = err instanceof Error ? (err.cause as Error | undefined)?.message : undefined;
    const why = err instanceof Error
      ? (cause ? cause.replace(/^error sending request for url \([^)]*\): /, "") : err.message)
      : String(err);
    const tls = /certificate|tls|ssl|UnknownIssuer|handshake/i.test(why);
    const fix = tls
      ? `the TLS connection failed; pass --ca-cert <file> to trust the registry's CA${
        isLoopbackHost(this.#host) ? "" : ", or --plain-http if it serves plain HTTP"
      }`
      : "check that the registry is running and reachable";
    return new RegistryError(`Cannot reach ${cleanUrl(url)} (${method}): ${why}; ${fix}`, {
      status: 0,
      method,
      url: cleanUrl(url),
      cause: err,
    });
  }

  /** The failure of a request that got an unexpected status; reads (and frees) the body. */
  async #statusError(res: Response, method: string, url: string): Promise<RegistryError> {
    let code: string | undefined;
    let detail: string | undefined;
    try {
      const text = (await res.text()).slice(0, ERROR_BODY_LIMIT);
      const first = JSON.parse(text)?.errors?.[0];
      if (typeof first?.code === "string") code = first.code;
      if (typeof first?.message === "string") detail = first.message;
    } catch {
      // Not an OCI error body.
    }
    const status = res.status;
    const label = code ?? STATUS_WORDS[status] ?? res.statusText.toUpperCase().replace(/ /g, "_");
    let fix: string;
    if (status === 401 || status === 403) {
      fix = await this.#auth.describeRejection(status, res.headers.get("www-authenticate"));
    } else if (code === "NAME_UNKNOWN" || (status === 404 && method === "POST")) {
      fix =
        `the repository ${this.#ref.repository} does not exist; create it first (some registries, such as ECR, require that)`;
    } else if (code === "DIGEST_INVALID") {
      fix = "the registry computed a different digest: the upload was corrupted on the way";
    } else if (status === 413) {
      fix = "the registry or a proxy refused the request size; try --chunk-size 50MB";
    } else if (isTransientStatus(status)) {
      fix = "the registry kept failing; try again later or raise --retries";
    } else {
      fix = detail ? `the registry says: ${detail.slice(0, 200)}` : "unexpected answer";
    }
    const err = new RegistryError(`${status} ${label} from ${method} ${cleanUrl(url)}: ${fix}`, {
      status,
      code,
      method,
      url: cleanUrl(url),
    });
    const after = parseRetryAfter(res.headers.get("retry-after"));
    if (after !== undefined) retryAfterOf.set(err, after);
    return err;
  }

  /** Headers with the current Authorization, refreshing an expired token first. */
  async #authHeaders(extra?: Record<string, string>): Promise<{ headers: Headers; gen: number }> {
    if (this.#auth.needsRefresh) await this.#auth.refresh();
    const headers = new Headers(extra);
    const gen = this.#auth.generation;
    const value = this.#auth.authorization();
    if (value) headers.set("Authorization", value);
    return { headers, gen };
  }

  /**
   * Sends a request with an in-memory body: answers one auth challenge, retries
   * transient failures in place with backoff, and throws {@linkcode RegistryError}
   * for anything not in `expect`. The caller must consume or cancel the body.
   */
  async request(method: string, url: string, options: RequestOptions): Promise<Response> {
    const retries = options.retries ?? this.retries;
    let challenged = false;
    for (let attempt = 0;; attempt++) {
      const { headers, gen } = await this.#authHeaders(options.headers);
      let res: Response;
      try {
        res = await this.#fetch(
          method,
          url,
          {
            headers,
            body: options.body as Uint8Array<ArrayBuffer> | undefined,
            signal: options.timeoutMs === undefined
              ? undefined
              : AbortSignal.any([this.#abort.signal, AbortSignal.timeout(options.timeoutMs)]),
          },
          headers.has("Authorization"),
        );
      } catch (err) {
        if (this.#abort.signal.aborted) throw err;
        const failure = this.#networkError(method, url, err);
        if (attempt < retries) {
          await this.#backoff(attempt);
          continue;
        }
        throw failure;
      }
      this.stats.bytesSent += options.body?.length ?? 0;
      if (res.status === 401 && !challenged) {
        const challenge = res.headers.get("www-authenticate");
        await res.body?.cancel();
        challenged = true;
        attempt--; // Authenticating is not a retry.
        await this.#auth.authenticate(challenge, gen);
        continue;
      }
      if (options.expect.includes(res.status)) return res;
      const err = await this.#statusError(res, method, url);
      if (isTransientStatus(res.status) && attempt < retries) {
        await this.#backoff(attempt, retryAfterOf.get(err));
        continue;
      }
      throw err;
    }
  }

  async #backoff(attempt: number, retryAfterMs?: number): Promise<void> {
    this.stats.retries++;
    await sleep(retryAfterMs ?? retryDelay(attempt, this.#delay), this.#abort.signal);
  }

  /**
   * The base URL (`https://host` or `http://host`), found once by pinging `/v2/`,
   * which also answers the auth challenge up front.
   */
  base(): Promise<string> {
    this.#base ??= (async () => {
      if (this.#options.plainHttp) return await this.#ping(`http://${this.#host}`);
      if (isLoopbackHost(this.#host) && !this.#options.caCert) {
        try {
          return await this.#ping(`https://${this.#host}`, 0, LOOPBACK_TLS_PROBE_MS);
        } catch (err) {
          if (!(err instanceof RegistryError) || err.status !== 0) throw err;
          this.#options.log?.(`HTTPS to ${this.#host} failed; using plain HTTP (loopback host)`);
          try {
            return await this.#ping(`http://${this.#host}`);
          } catch (plainErr) {
            // A registry that answered over plain HTTP (401, 404, …) speaks HTTP: its answer
            // counts. No answer, or a 400 (what an HTTPS server says to plain HTTP), means the
            // registry is HTTPS, and the HTTPS failure (e.g. an unknown CA) is the one to fix.
            if (
              !(plainErr instanceof RegistryError) ||
              (plainErr.status !== 0 && plainErr.status !== HTTP_TO_HTTPS_STATUS)
            ) throw plainErr;
            throw new RegistryError(
              `${err.message} (plain HTTP failed too: ${plainErr.message.split(": ")[0]})`,
              { status: err.status, method: err.method, url: err.url, cause: err },
            );
          }
        }
      }
      return await this.#ping(`https://${this.#host}`);
    })();
    this.#base.catch(() => {});
    return this.#base;
  }

  async #ping(base: string, retries?: number, timeoutMs?: number): Promise<string> {
    const res = await this.request("GET", `${base}/v2/`, { expect: [200], retries, timeoutMs });
    await res.body?.cancel();
    return base;
  }

  async #repoUrl(path: string): Promise<string> {
    return `${await this.base()}/v2/${this.#ref.repository}/${path}`;
  }

  // -- ImageSink -------------------------------------------------------------

  async has(desc: Descriptor): Promise<boolean> {
    const manifest = MANIFEST_TYPES.has(desc.mediaType);
    const url = await this.#repoUrl(`${manifest ? "manifests" : "blobs"}/${desc.digest}`);
    const res = await this.request("HEAD", url, {
      expect: [200, 404],
      headers: manifest ? { Accept: desc.mediaType } : undefined,
    });
    await res.body?.cancel();
    if (res.status === 200) this.stats.blobsSkipped++;
    return res.status === 200;
  }

  /** Opens an upload session: the `Location` to send to and the minimum chunk size. */
  async startUpload(): Promise<{ location: string; minChunk: number }> {
    const url = await this.#repoUrl("blobs/uploads/");
    const res = await this.request("POST", url, { expect: [202], body: new Uint8Array(0) });
    await res.body?.cancel();
    const location = res.headers.get("location");
    if (!location) {
      throw new RegistryError(
        `202 from POST ${cleanUrl(url)} without a Location header: not an OCI registry`,
        { status: 202, method: "POST", url: cleanUrl(url) },
      );
    }
    const min = Number(res.headers.get("oci-chunk-min-length") ?? 0);
    return { location: new URL(location, url).href, minChunk: Number.isFinite(min) ? min : 0 };
  }

  async createBlob(options: CreateBlobOptions): Promise<BlobWriter> {
    const { location, minChunk } = await this.startUpload();
    const chunk = this.#options.chunkSize === undefined
      ? undefined
      : Math.max(this.#options.chunkSize, minChunk);
    const upload = new Upload(this, options.mediaType, location, chunk);
    this.#writers.add(upload);
    upload.done.finally(() => this.#writers.delete(upload));
    return upload;
  }

  /** Records a finished upload in the stats. */
  uploaded(desc: Descriptor, mediaType: string, seconds: number | undefined): void {
    this.stats.blobsUploaded++;
    this.stats.bytesUploaded += desc.size;
    if (seconds !== undefined) {
      this.stats.blobs.push({
        digest: desc.digest,
        mediaType,
        size: desc.size,
        seconds,
        mbPerSecond: seconds > 0 ? desc.size / 1e6 / seconds : 0,
      });
    }
  }

  /** Commits an upload session with `PUT <location>?digest=` and an optional final body. */
  async finishUpload(location: string, desc: Descriptor, body?: Uint8Array): Promise<void> {
    const url = withDigest(location, desc.digest);
    let res: Response;
    try {
      res = await this.request("PUT", url, {
        expect: [201, 204],
        body: body ?? new Uint8Array(0),
        headers: { "Content-Type": "application/octet-stream" },
      });
    } catch (err) {
      if (err instanceof RegistryError && err.status === 404) {
        // A lost answer to an earlier PUT that did land, or a lost session.
        if (await this.#exists(desc)) return;
        throw new RetryableBlobError(err);
      }
      throw err;
    }
    await res.body?.cancel();
    const got = res.headers.get("docker-content-digest");
    if (got && got !== desc.digest) {
      throw new RegistryError(
        `201 from PUT ${
          cleanUrl(url)
        } with Docker-Content-Digest ${got}, expected ${desc.digest}: the registry stored different content`,
        { status: 201, method: "PUT", url: cleanUrl(url), code: "DIGEST_INVALID" },
      );
    }
  }

  /** HEAD without counting a skip. */
  async #exists(desc: Descriptor): Promise<boolean> {
    const url = await this.#repoUrl(`blobs/${desc.digest}`);
    const res = await this.request("HEAD", url, { expect: [200, 404] });
    await res.body?.cancel();
    return res.status === 200;
  }

  async putBlob(blob: Blob): Promise<void> {
    const desc = blob.descriptor;
    if (await this.has(desc)) return;
    const start = performance.now();
    if (MANIFEST_TYPES.has(desc.mediaType)) {
      await this.#putManifest(desc.digest, blob);
    } else {
      const { location } = await this.startUpload();
      await this.finishUpload(location, desc, blob.bytes);
    }
    this.uploaded(desc, desc.mediaType, (performance.now() - start) / 1000);
  }

  async #putManifest(reference: string, blob: Blob): Promise<string> {
    const url = await this.#repoUrl(`manifests/${reference}`);
    const res = await this.request("PUT", url, {
      expect: [201, 200],
      body: blob.bytes,
      headers: { "Content-Type": blob.descriptor.mediaType },
    });
    await res.body?.cancel();
    const got = res.headers.get("docker-content-digest");
    if (got && got !== blob.descriptor.digest) {
      throw new RegistryError(
        `${res.status} from PUT ${
          cleanUrl(url)
        } with Docker-Content-Digest ${got}, expected ${blob.descriptor.digest}: the registry rewrote the manifest`,
        { status: res.status, method: "PUT", url: cleanUrl(url), code: "DIGEST_INVALID" },
      );
    }
    return got ?? blob.descriptor.digest;
  }

  async commit(record: ImageRecord): Promise<void> {
    try {
      const digest = await this.#putManifest(this.#ref.tag, record.root);
      this.stats.bytesUploaded += record.root.bytes.length;
      this.digestReference = `${this.#ref.registry}/${this.#ref.repository}@${digest}`;
    } finally {
      this.close();
    }
  }

  async abort(): Promise<void> {
    await Promise.all([...this.#writers].map((w) => w.abort()));
    this.#abort.abort();
    this.close();
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#client.close();
  }

  // -- used by Upload --------------------------------------------------------

  /** Starts the streamed PATCH whose body is `body`. */
  async streamPatch(
    location: string,
    body: ReadableStream<Uint8Array>,
    signal: AbortSignal,
  ): Promise<Response> {
    const { headers } = await this.#authHeaders({ "Content-Type": "application/octet-stream" });
    return this.#fetch(
      "PATCH",
      location,
      { headers, body, duplex: "half", signal: AbortSignal.any([signal, this.#abort.signal]) },
      headers.has("Authorization"),
    );
  }

  /** Turns the outcome of a streamed PATCH into the error `write()`/`commit()` throw. */
  async patchFailure(
    location: string,
    outcome: { res?: Response; err?: unknown },
  ): Promise<Error> {
    if (!outcome.res) {
      return new RetryableBlobError(this.#networkError("PATCH", location, outcome.err));
    }
    const err = await this.#statusError(outcome.res, "PATCH", location);
    if (outcome.res.status === 401) {
      // The token expired mid-upload: fetch a fresh one with the next POST.
      await this.#auth.refresh().catch(() => {});
      return new RetryableBlobError(err);
    }
    if (isTransientStatus(err.status) || err.code === "BLOB_UPLOAD_UNKNOWN" || err.status === 404) {
      return new RetryableBlobError(err, retryAfterOf.get(err));
    }
    return err;
  }

  /** Is `err` from {@linkcode request} worth retrying after checking the session? */
  isTransient(err: unknown): err is RegistryError {
    return err instanceof RegistryError && isTransientStatus(err.status);
  }

  retryAfter(err: RegistryError): number | undefined {
    return retryAfterOf.get(err);
  }

  backoff(attempt: number, retryAfterMs?: number): Promise<void> {
    return this.#backoff(attempt, retryAfterMs);
  }

  /** Best-effort DELETE of an upload session. */
  async cancelUpload(location: string): Promise<void> {
    try {
      const { headers } = await this.#authHeaders();
      const res = await this.#fetch(
        "DELETE",
        location,
        { headers, signal: AbortSignal.timeout(5_000) },
        headers.has("Authorization"),
      );
      await res.body?.cancel();
    } catch {
      // Best effort: the registry expires abandoned sessions itself.
    }
  }
}

/** One blob upload session: streamed (one PATCH) or chunked. */
class Upload implements BlobWriter {
  readonly done: Promise<void>;
  readonly #sink: Registry;
  readonly #mediaType: string;
  readonly #chunkSize?: number;
  readonly #start = performance.now();
  readonly #abort = new AbortController();
  #location: string;
  #written = 0;
  #failed?: Error;
  #finished = false;
  #resolveDone!: () => void;
  // Streamed mode.
  #writer?: WritableStreamDefaultWriter<Uint8Array>;
  #outcome?: Promise<{ res?: Response; err?: unknown }>;
  // Chunked mode.
  #buffer?: Uint8Array;
  #buffered = 0;
  #sent = 0;

  constructor(sink: Registry, mediaType: string, location: string, chunkSize?: number) {
    this.#sink = sink;
    this.#mediaType = mediaType;
    this.#location = location;
    this.#chunkSize = chunkSize;
    this.done = new Promise((r) => this.#resolveDone = r);
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (this.#failed) throw this.#failed;
    if (this.#finished) throw new TypeError("Cannot write to a blob upload that has finished");
    if (chunk.length === 0) return;
    try {
      if (this.#chunkSize === undefined) await this.#streamWrite(chunk);
      else await this.#chunkWrite(chunk);
      this.#written += chunk.length;
    } catch (err) {
      this.#failed = err as Error;
      throw err;
    }
  }

  // -- streamed --------------------------------------------------------------

  async #streamWrite(chunk: Uint8Array): Promise<void> {
    if (!this.#writer) {
      // The readable side has no queue: a write waits until the HTTP client pulls.
      const pipe = new TransformStream<Uint8Array, Uint8Array>(
        undefined,
        { highWaterMark: 1 },
        { highWaterMark: 0 },
      );
      this.#writer = pipe.writable.getWriter();
      this.#writer.closed.catch(() => {});
      this.#outcome = this.#sink.streamPatch(this.#location, pipe.readable, this.#abort.signal)
        .then((res) => ({ res }), (err) => ({ err }));
    }
    // No copy: BlobWriter callers never modify a chunk they have written.
    const pending = this.#writer.write(chunk);
    pending.catch(() => {});
    let early: { res?: Response; err?: unknown } | undefined;
    try {
      early = await Promise.race([pending.then(() => undefined), this.#outcome!]);
    } catch {
      early = await this.#outcome!;
    }
    if (early) throw await this.#sink.patchFailure(this.#location, early);
    this.#sink.stats.bytesSent += chunk.length;
  }

  async #streamFinish(): Promise<void> {
    if (!this.#writer) return; // Empty blob: nothing to PATCH.
    await this.#writer.close().catch(() => {});
    const outcome = await this.#outcome!;
    if (!outcome.res || outcome.res.status !== 202) {
      throw await this.#sink.patchFailure(this.#location, outcome);
    }
    await outcome.res.body?.cancel();
    const next = outcome.res.headers.get("location");
    if (next) this.#location = new URL(next, this.#location).href;
  }

  // -- chunked ---------------------------------------------------------------

  async #chunkWrite(chunk: Uint8Array): Promise<void> {
    const size = this.#chunkSize!;
    this.#buffer ??= new Uint8Array(size);
    let pos = 0;
    while (pos < chunk.length) {
      const n = Math.min(size - this.#buffered, chunk.length - pos);
      this.#buffer.set(chunk.subarray(pos, pos + n), this.#buffered);
      this.#buffered += n;
      pos += n;
      if (this.#buffered === size) await this.#flush();
    }
  }

  /** PATCHes the buffered chunk; retries in place after checking what the registry has. */
  async #flush(): Promise<void> {
    if (this.#buffered === 0) return;
    const chunk = this.#buffer!.subarray(0, this.#buffered);
    const start = this.#sent;
    const end = start + chunk.length - 1;
    // Where the next attempt starts: after a broken PATCH the registry may
    // keep part of the chunk, and the session's Range says how much.
    let from = start;
    for (let attempt = 0;; attempt++) {
      try {
        const res = await this.#sink.request("PATCH", this.#location, {
          expect: [202],
          body: chunk.subarray(from - start),
          retries: 0,
          headers: {
            "Content-Type": "application/octet-stream",
            "Content-Range": `${from}-${end}`,
          },
        });
        await res.body?.cancel();
        this.#accept(res, end);
        break;
      } catch (err) {
        if (!this.#sink.isTransient(err)) {
          // A lost session (404) or a range the registry no longer agrees with (416):
          // only sending the whole blob again can fix it.
          if (err instanceof RegistryError && (err.status === 404 || err.status === 416)) {
            throw new RetryableBlobError(err);
          }
          throw err;
        }
        if (attempt >= this.#sink.retries) throw new RetryableBlobError(err);
        await this.#sink.backoff(attempt, this.#sink.retryAfter(err));
        // How much of the chunk landed before the failure? Ask the session.
        let status: Response;
        try {
          status = await this.#sink.request("GET", this.#location, { expect: [204] });
        } catch (statusErr) {
          if (statusErr instanceof RegistryError) throw new RetryableBlobError(statusErr);
          throw statusErr;
        }
        await status.body?.cancel();
        const has = rangeEnd(status.headers.get("range")) + 1;
        const loc = status.headers.get("location");
        if (loc) this.#location = new URL(loc, this.#location).href;
        if (has === end + 1) {
          this.#accept(status, end);
          break;
        }
        if (start === 0 && has <= 1) {
          from = 0; // An empty session reports "0-0" too.
        } else if (has >= start && has <= end) {
          from = has;
        } else {
          throw new RetryableBlobError(
            new RegistryError(
              `Upload session at ${
                cleanUrl(this.#location)
              } holds ${has} bytes after a failed chunk at ${start}-${end}`,
              { status: 416, method: "PATCH", url: cleanUrl(this.#location) },
            ),
          );
        }
      }
    }
    this.#sent = end + 1;
    this.#buffered = 0;
  }

  /** Follows the Location of a chunk's answer and checks its Range. */
  #accept(res: Response, end: number): void {
    const loc = res.headers.get("location");
    if (loc) this.#location = new URL(loc, this.#location).href;
    const got = rangeEnd(res.headers.get("range"));
    if (got !== -1 && got !== end) {
      throw new RetryableBlobError(
        new RegistryError(
          `Registry acknowledged bytes 0-${got} after chunk ending at ${end} (PATCH ${
            cleanUrl(this.#location)
          })`,
          { status: 416, method: "PATCH", url: cleanUrl(this.#location) },
        ),
      );
    }
  }

  // -- finish ----------------------------------------------------------------

  async commit(desc: Descriptor): Promise<void> {
    if (this.#failed) throw this.#failed;
    if (this.#finished) throw new TypeError("Cannot commit a blob upload twice");
    if (desc.size !== this.#written) {
      throw new RangeError(
        `Cannot commit blob ${desc.digest}: ${this.#written} bytes were written but the descriptor says ${desc.size}`,
      );
    }
    try {
      if (this.#chunkSize === undefined) await this.#streamFinish();
      else await this.#flush();
      await this.#sink.finishUpload(this.#location, desc);
    } catch (err) {
      this.#failed = err as Error;
      throw err;
    }
    this.#finished = true;
    this.#sink.uploaded(desc, this.#mediaType, (performance.now() - this.#start) / 1000);
    this.#resolveDone();
  }

  async abort(): Promise<void> {
    if (this.#finished) return;
    this.#finished = true;
    this.#failed ??= new TypeError("The blob upload was aborted");
    this.#abort.abort();
    await this.#writer?.abort().catch(() => {});
    await this.#outcome?.then((o) => o.res?.body?.cancel().catch(() => {}));
    await this.#sink.cancelUpload(this.#location);
    this.#resolveDone();
  }
}
