/**
 * Container engines and builders: finding one on PATH, checking that its
 * daemon answers, and running `build` and `load` as child processes that are
 * always stopped when imgmkr stops.
 *
 * @module
 */

import { BuilderError } from "./errors.ts";

/** Builders imgmkr can drive, in the order they are tried by default. */
export const BUILDERS = ["finch", "docker", "podman", "nerdctl", "buildah"] as const;
/** A builder name. */
export type BuilderName = typeof BUILDERS[number];
/** Builders whose CLI has a `load` command reading a docker-archive on stdin. */
export const LOADERS: readonly BuilderName[] = ["finch", "docker", "podman", "nerdctl"];
/** How long `<builder> info` may take before the daemon counts as unreachable. */
const INFO_TIMEOUT_MS = 20_000;
/** After SIGTERM, how long a child gets to exit before SIGKILL. */
const KILL_GRACE_MS = 5_000;

/** True if `name` is a builder imgmkr knows. */
export function isBuilderName(name: string): name is BuilderName {
  return (BUILDERS as readonly string[]).includes(name);
}

/** Options for {@linkcode findOnPath}. */
export interface FindOnPathOptions {
  /**
   * The PATH to search.
   * @default {Deno.env.get("PATH")}
   */
  path?: string;
}

/** Returns the full path of executable `name` on PATH, or undefined. */
export function findOnPath(name: string, options: FindOnPathOptions = {}): string | undefined {
  const path = options.path ?? Deno.env.get("PATH") ?? "";
  const windows = Deno.build.os === "windows";
  const exts = windows ? ["", ".exe", ".cmd", ".bat"] : [""];
  for (const dir of path.split(windows ? ";" : ":")) {
    if (!dir) continue;
    for (const ext of exts) {
      const candidate = `${dir}/${name}${ext}`;
      try {
        const st = Deno.statSync(candidate);
        if (st.isFile && (windows || ((st.mode ?? 0) & 0o111) !== 0)) return candidate;
      } catch {
        // not here
      }
    }
  }
  return undefined;
}

/** Options for {@linkcode detectBuilder}. */
export interface DetectBuilderOptions {
  /**
   * The builder asked for with `--builder`; when unset, the first of {@linkcode BUILDERS} on PATH.
   * @default {undefined}
   */
  requested?: BuilderName;
  /**
   * Only consider builders from this list (e.g. {@linkcode LOADERS} for `--output load`).
   * @default {BUILDERS}
   */
  among?: readonly BuilderName[];
}

/**
 * Picks the builder to use.
 *
 * @throws {BuilderError} when the requested builder, or every candidate, is missing from PATH.
 */
export function detectBuilder(options: DetectBuilderOptions = {}): BuilderName {
  const among = options.among ?? BUILDERS;
  if (options.requested) {
    if (!findOnPath(options.requested)) {
      throw new BuilderError(
        `--builder ${options.requested}: '${options.requested}' is not on PATH; install it or pick another with --builder`,
      );
    }
    return options.requested;
  }
  const found = among.find((b) => findOnPath(b));
  if (!found) {
    throw new BuilderError(
      `No image builder found on PATH (tried ${among.join(", ")}): install one, pass --builder, ` +
        `or use --dry-run, --output oci:<dir> or --output oci-archive:<file>, which need none`,
    );
  }
  return found;
}

/** Options for {@linkcode checkDaemon}. */
export interface CheckDaemonOptions {
  /**
   * Stop waiting when this signal aborts.
   * @default {undefined}
   */
  signal?: AbortSignal;
}

/**
 * Checks that the builder can reach its daemon (`<builder> info` succeeds).
 *
 * @throws {BuilderError} naming the builder and what it said.
 */
export async function checkDaemon(
  builder: BuilderName,
  options: CheckDaemonOptions = {},
): Promise<void> {
  const child = new Deno.Command(builder, {
    args: ["info"],
    stdin: "null",
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => kill(child), INFO_TIMEOUT_MS);
  const onAbort = () => kill(child);
  options.signal?.addEventListener("abort", onAbort);
  try {
    const out = await child.output();
    if (!out.success) {
      const said = lastLine(new TextDecoder().decode(out.stderr));
      throw new BuilderError(
        `'${builder} info' failed, so its daemon is not reachable${said ? `: ${said}` : ""}. ` +
          `Start it, set DOCKER_HOST, or pick another --builder`,
      );
    }
  } finally {
    clearTimeout(timer);
    options.signal?.removeEventListener("abort", onAbort);
  }
}

function kill(child: Deno.ChildProcess, signal: Deno.Signal = "SIGTERM"): void {
  try {
    child.kill(signal);
  } catch {
    // already gone
  }
}

function lastLine(text: string): string {
  return text.trim().split("\n").filter(Boolean).at(-1)?.trim() ?? "";
}

/** Options for {@linkcode runChild}. */
export interface RunChildOptions {
  /**
   * Kill the child (SIGTERM, then SIGKILL) when this aborts, and wait for it to exit.
   * @default {undefined}
   */
  signal?: AbortSignal;
  /**
   * Receives the child's stdout and stderr text as it arrives.
   * @default {discard}
   */
  onOutput?: (text: string) => void;
  /**
   * Working directory.
   * @default {Deno.cwd()}
   */
  cwd?: string;
  /**
   * Bytes to feed to stdin, as a stream; stdin is closed when it ends.
   * @default {undefined (stdin is /dev/null)}
   */
  stdin?: ReadableStream<Uint8Array>;
}

/** What a finished child printed and how it exited. */
export interface ChildResult {
  /** Exit code (or 128+signal). */
  code: number;
  /** The last lines of stderr and stdout, for error messages. */
  tail: string;
}

/** Lines of output kept for error messages. */
const TAIL_LINES = 20;

/**
 * Runs a command to completion, streaming its output, and guarantees the
 * child has exited when the returned promise settles, even when aborted.
 */
export async function runChild(cmd: string[], options: RunChildOptions = {}): Promise<ChildResult> {
  const child = new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    cwd: options.cwd,
    stdin: options.stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let killTimer: ReturnType<typeof setTimeout> | undefined;
  const onAbort = () => {
    kill(child, "SIGTERM");
    killTimer = setTimeout(() => kill(child, "SIGKILL"), KILL_GRACE_MS);
  };
  if (options.signal?.aborted) onAbort();
  options.signal?.addEventListener("abort", onAbort);
  const tail: string[] = [];
  const pump = async (stream: ReadableStream<Uint8Array>) => {
    const decoder = new TextDecoder();
    for await (const chunk of stream) {
      const text = decoder.decode(chunk, { stream: true });
      options.onOutput?.(text);
      tail.push(...text.split("\n").filter((l) => l.trim() !== ""));
      if (tail.length > TAIL_LINES) tail.splice(0, tail.length - TAIL_LINES);
    }
  };
  const feed = options.stdin
    ? options.stdin.pipeTo(child.stdin).catch(() => {
      // The child closed stdin early; its exit code tells what happened.
    })
    : Promise.resolve();
  try {
    const [status] = await Promise.all([
      child.status,
      pump(child.stdout),
      pump(child.stderr),
      feed,
    ]);
    return { code: status.code, tail: tail.join("\n") };
  } finally {
    clearTimeout(killTimer);
    options.signal?.removeEventListener("abort", onAbort);
  }
}

/** Options for {@linkcode buildImage}. */
export interface BuildImageOptions {
  /** The builder to run. */
  builder: BuilderName;
  /** Build context directory (holds the Dockerfile). */
  contextDir: string;
  /** `name:tag` to tag the image with. */
  tag: string;
  /**
   * Platform to build for.
   * @default {"linux/amd64"}
   */
  platform?: string;
  /**
   * Stops the build (and the child) when aborted.
   * @default {undefined}
   */
  signal?: AbortSignal;
  /**
   * Receives the builder's output as it arrives.
   * @default {discard}
   */
  onOutput?: (text: string) => void;
}

/**
 * Builders that build untagged (`--iidfile`) and are then tagged by imgmkr
 * after success. docker's legacy builder keeps running an `ADD` when its CLI
 * is killed and tags the image afterwards, long after imgmkr has exited;
 * an untagged build can never do that. nerdctl and finch use BuildKit, which
 * cancels the build (tag included) with its client, so they get `-t`.
 */
const TAG_AFTER_BUILD: readonly BuilderName[] = ["docker", "podman", "buildah"];

/** Where the builder writes the built image's ID: in the build dir, so it is cleaned up with it. */
function iidFile(contextDir: string): string {
  return `${contextDir}/.imgmkr-image-id`;
}

/** The argv that builds `contextDir` with `builder`. */
export function buildCommand(options: BuildImageOptions): string[] {
  const platform = options.platform ?? "linux/amd64";
  const sub = options.builder === "buildah" ? ["bud"] : ["build"];
  const tagging = TAG_AFTER_BUILD.includes(options.builder)
    ? ["--iidfile", iidFile(options.contextDir)]
    : ["-t", options.tag];
  return [
    options.builder,
    ...sub,
    "--platform",
    platform,
    ...tagging,
    "-f",
    `${options.contextDir}/Dockerfile`,
    options.contextDir,
  ];
}

/**
 * Builds and tags the image. If aborted, waits for the builder to exit and
 * restores the tag to what it was before, so no partial build stays tagged.
 *
 * @throws {BuilderError} when the builder exits non-zero.
 */
export async function buildImage(options: BuildImageOptions): Promise<void> {
  const { builder, tag, signal } = options;
  const before = await imageId(builder, tag);
  try {
    const result = await runChild(buildCommand(options), { signal, onOutput: options.onOutput });
    if (signal?.aborted) return;
    if (result.code !== 0) {
      throw new BuilderError(
        `'${builder} build' failed with exit code ${result.code}:\n${result.tail}`,
      );
    }
    if (!TAG_AFTER_BUILD.includes(builder)) return;
    const id = (await Deno.readTextFile(iidFile(options.contextDir))).trim();
    const tagged = await runChild([builder, "tag", id, tag], { signal });
    if (signal?.aborted) return;
    if (tagged.code !== 0) {
      throw new BuilderError(
        `'${builder} tag ${id} ${tag}' failed with exit code ${tagged.code}:\n${tagged.tail}`,
      );
    }
  } finally {
    if (signal?.aborted) await restoreTag(builder, tag, before);
  }
}

/** The image ID that `tag` points to now, or undefined. */
export async function imageId(builder: BuilderName, tag: string): Promise<string | undefined> {
  const args = builder === "buildah"
    ? ["inspect", "--type", "image", "--format", "{{.FromImageID}}", tag]
    : ["image", "inspect", "--format", "{{.Id}}", tag];
  const out = await new Deno.Command(builder, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "null",
  }).output();
  return out.success ? new TextDecoder().decode(out.stdout).trim() || undefined : undefined;
}

/** Points `tag` back at `previous`, or removes it if it was not there before. */
async function restoreTag(
  builder: BuilderName,
  tag: string,
  previous: string | undefined,
): Promise<void> {
  const now = await imageId(builder, tag);
  if (now === undefined || now === previous) return;
  const args = previous
    ? ["tag", previous, tag]
    : builder === "buildah"
    ? ["rmi", tag]
    : ["rmi", tag];
  await new Deno.Command(builder, { args, stdin: "null", stdout: "null", stderr: "null" }).output();
}

/** The argv that loads a docker-archive from stdin into `builder`. */
export function loadCommand(builder: BuilderName): string[] {
  if (!LOADERS.includes(builder)) {
    throw new BuilderError(
      `--output load: ${builder} cannot load images; use ${LOADERS.join(", ")}`,
    );
  }
  return [builder, "load"];
}

/** Where the docker CLI finds the daemon when neither DOCKER_HOST nor a context says otherwise. */
export const DEFAULT_DOCKER_SOCKET = "/var/run/docker.sock";

/** Options for {@linkcode dockerSocket}. */
export interface DockerSocketOptions {
  /**
   * The environment (DOCKER_HOST, DOCKER_CONTEXT, DOCKER_CONFIG, HOME).
   * @default {Deno.env.toObject()}
   */
  env?: Record<string, string | undefined>;
}

/**
 * The unix socket of the Docker daemon that `docker` would talk to, when it
 * is one this process can open: `unix://` in DOCKER_HOST, else the default
 * socket. Undefined for a tcp:// or ssh:// DOCKER_HOST, or a docker context
 * other than `default`, which only the CLI resolves; callers then use the CLI.
 */
export function dockerSocket(options: DockerSocketOptions = {}): string | undefined {
  const env = options.env ?? Deno.env.toObject();
  const host = env.DOCKER_HOST;
  let path: string;
  if (host) {
    if (!host.startsWith("unix://")) return undefined;
    path = host.slice("unix://".length);
  } else {
    if (currentDockerContext(env) !== "default") return undefined;
    path = DEFAULT_DOCKER_SOCKET;
  }
  try {
    return Deno.statSync(path).isSocket ? path : undefined;
  } catch {
    return undefined;
  }
}

/** The docker context in use: DOCKER_CONTEXT, else `currentContext` of the CLI config, else `default`. */
function currentDockerContext(env: Record<string, string | undefined>): string {
  if (env.DOCKER_CONTEXT) return env.DOCKER_CONTEXT;
  const dir = env.DOCKER_CONFIG ?? (env.HOME ? `${env.HOME}/.docker` : undefined);
  if (!dir) return "default";
  try {
    const config = JSON.parse(Deno.readTextFileSync(`${dir}/config.json`));
    return typeof config?.currentContext === "string" && config.currentContext
      ? config.currentContext
      : "default";
  } catch {
    return "default";
  }
}

/** Options for {@linkcode engineApiLoad}. */
export interface EngineApiLoadOptions {
  /**
   * Abort the request (the daemon then drops what it received) when this aborts.
   * @default {undefined}
   */
  signal?: AbortSignal;
}

/**
 * Streams a docker-archive into `POST /images/load` of the Docker Engine API
 * listening on unix socket `socket`, as `docker load` does but without the
 * CLI relaying every byte through a pipe. Resolves like {@linkcode runChild}:
 * `code` 0 when the daemon loaded the image, else the HTTP status (or 1 for
 * an error reported inside a 200 response) with the daemon's message as `tail`.
 *
 * @throws {TypeError} when the socket cannot be reached or the stream breaks.
 */
export async function engineApiLoad(
  socket: string,
  body: ReadableStream<Uint8Array>,
  options: EngineApiLoadOptions = {},
): Promise<ChildResult> {
  const client = Deno.createHttpClient({ proxy: { transport: "unix", path: socket } });
  try {
    // The host is not used (the socket is).
    let res: Response;
    let text: string;
    try {
      // The daemon's own API version, from /_ping as the docker CLI negotiates it: paths
      // without a version are deprecated, and a fixed old one may be below a new daemon's minimum.
      const ping = await fetch("http://docker/_ping", { client, signal: options.signal });
      await ping.body?.cancel();
      const version = ping.headers.get("api-version");
      const prefix = version && /^\d+\.\d+$/.test(version) ? `/v${version}` : "";
      res = await fetch(`http://docker${prefix}/images/load?quiet=1`, {
        method: "POST",
        headers: { "content-type": "application/x-tar" },
        body,
        client,
        signal: options.signal,
      });
      text = await res.text();
    } catch (err) {
      // A body the request never took must be cancelled, or its writer waits forever.
      if (!body.locked) await body.cancel(err).catch(() => {});
      if (options.signal?.aborted) throw err;
      // "fetch failed" alone says nothing: the cause names the socket error.
      const cause = (err as Error).cause;
      const why = cause instanceof Error ? cause.message.replace(/^.*client error /, "") : "";
      throw new TypeError(`${(err as Error).message}${why ? `: ${why}` : ""}`, { cause: err });
    }
    const messages: string[] = [];
    let failed = !res.ok;
    for (const line of text.split("\n")) {
      if (!line.trim()) continue;
      try {
        const msg = JSON.parse(line);
        if (msg.error || msg.errorDetail) failed = true;
        const said = msg.errorDetail?.message ?? msg.error ?? msg.message ?? msg.stream;
        if (typeof said === "string" && said.trim()) messages.push(said.trim());
      } catch {
        messages.push(line.trim());
      }
    }
    const tail = messages.slice(-TAIL_LINES).join("\n");
    return { code: failed ? (res.ok ? 1 : res.status) : 0, tail };
  } finally {
    client.close();
  }
}
