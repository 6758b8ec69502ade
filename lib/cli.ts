/**
 * The command line: flags, validation, help, and the run of each output path.
 * Every bad input becomes a {@linkcode UsageError} before anything is written.
 *
 * @module
 */

import { accessSync, constants as fsConstants } from "node:fs";
import { parseArgs } from "node:util";
import { type BuildResult, describePlan, runBuild } from "./build.ts";
import { defaultCacheDir, LayerCache } from "./cache.ts";
import { EXIT_FAILURE, EXIT_USAGE, InterruptedError, UsageError } from "./errors.ts";
import { type BuilderName, BUILDERS, checkDaemon, detectBuilder, isBuilderName } from "./engine.ts";
import type { NativeOutput } from "./image.ts";
import { Progress } from "./progress.ts";
import { type Compression, formatPlatform, parsePlatform, type Platform } from "./oci.ts";
import type { RegistrySinkOptions } from "./registry.ts";
import { DEFAULT_MAX_DEPTH, type LayerPlan, MAX_MAX_DEPTH, planLayers } from "./plan.ts";
import { formatReference, parseReference, type Reference } from "./reference.ts";
import { formatSize, parseSize, parseSizeList } from "./sizes.ts";

/** Layers generated at once by default: enough to keep 2 cores and a disk busy. */
export const DEFAULT_MAX_CONCURRENT = 5;
/** The platform built when `--platform` is not given. */
export const DEFAULT_PLATFORM = "linux/amd64";
/** Default `--retries` for registry requests. */
export const DEFAULT_RETRIES = 3;
/** Largest `--seed`: seeds are printed and typed, so keep them exact in a double. */
export const MAX_SEED = Number.MAX_SAFE_INTEGER;
/** The version printed by `--version`; kept equal to deno.json's by a test. */
export const VERSION = "0.1.0";

/** Where the image goes. */
export type Output =
  | { kind: "build" }
  | { kind: "oci"; dir: string }
  | { kind: "oci-archive"; file: string }
  | { kind: "load" }
  | { kind: "push" };

/** A fully validated run. */
export interface Config {
  /** Layer sizes in bytes. */
  sizes: number[];
  /** The image reference. */
  reference: Reference;
  /** Parent of the temp build dir. */
  tmpdirPrefix: string;
  /** Layers generated at once. */
  maxConcurrent: number;
  /** Mock root filesystem per layer. */
  mockFs: boolean;
  /** Deepest nesting with mock-fs. */
  maxDepth: number;
  /** Exact file count per layer with mock-fs, if given. */
  targetFiles?: number;
  /** The seed. */
  seed: number;
  /** True when no `--seed` was given and one was drawn. */
  seedDrawn: boolean;
  /** Requested builder. */
  builder?: BuilderName;
  /** Target platforms (one for `build`). */
  platforms: Platform[];
  /** Print the plan only. */
  dryRun: boolean;
  /** Errors only. */
  quiet: boolean;
  /** Request/response trace on stderr (never credentials). */
  verbose: boolean;
  /** Destinations. */
  outputs: Output[];
  /** Layer compression for native outputs. */
  compression: Compression;
  /** Compression level, if given. */
  compressionLevel?: number;
  /** Percentage of random bytes. */
  entropy: number;
  /** Same layers for every platform. */
  shareLayers: boolean;
  /** JSON summary on stdout. */
  json: boolean;
  /** Use the layer cache (off with `--no-cache`). */
  cache: boolean;
  /** Registry options for `--output push`. */
  push: PushFlags;
}

/** Registry flags. */
export interface PushFlags {
  /** Chunked upload size in bytes; one streamed PATCH when unset. */
  chunkSize?: number;
  /** `--username`. */
  username?: string;
  /** Read the password from stdin. */
  passwordStdin: boolean;
  /** Force plain HTTP. */
  plainHttp: boolean;
  /** PEM file of a CA to trust. */
  caCert?: string;
  /** Retries per request or blob. */
  retries: number;
}

/** The result of parsing: run, or print help/version. */
export type Command = { kind: "help" } | { kind: "version" } | { kind: "run"; config: Config };

/** Usage text for `--help`. */
export const HELP = `imgmkr ${VERSION}: create mock OCI container images for testing image pull

Usage:
  imgmkr --layer-sizes <list> [options] <repo[:tag]>
  imgmkr --help | --version

Layers:
  --layer-sizes <list>       Comma list of layer sizes, e.g. 512KB,100MB,2GB (required).
                             Units B, KB, MB, GB, TB (or KiB…TiB), 1 KB = 1024 bytes; at most 127
  --mock-fs                  Make each layer a tree of many files, skewed like a real rootfs
  --max-depth <n>            Deepest directory nesting with --mock-fs (default ${DEFAULT_MAX_DEPTH})
  --target-files <n>         Exact files per layer with --mock-fs (default: 1 per 10 MB, 5..1000)
  --entropy <0-100>          Percent of random bytes; the rest compresses well (default 100)
  --seed <n>                 Same seed, same bytes, same digests (default: random, printed)

Output:
  --output <dest>            build (default), oci:<dir>, oci-archive:<file>, load, push.
                             Native outputs (all but build) may be repeated
  --builder <name>           ${BUILDERS.join(", ")} (default: first found, in that order)
  --platform <os/arch,...>   Target platform(s) (default ${DEFAULT_PLATFORM}); several need a native output
  --share-layers             With several platforms, reuse the same layers for all
  --compression <c>          gzip (default), zstd or none, for native outputs
  --compression-level <n>    gzip 0-9, zstd 1-19
  --tmpdir-prefix <dir>      Where the temp build dir goes (default: the system temp dir)
  --max-concurrent <n>       Layers generated at once (default ${DEFAULT_MAX_CONCURRENT})

Registry (--output push):
  --username <user>          With --password-stdin: credentials for the registry
  --password-stdin           Read the password from stdin
  --plain-http               Use HTTP, not HTTPS (for localhost, 127.0.0.0/8 and ::1,
                             HTTPS is tried first and HTTP used when it fails)
  --ca-cert <file>           Trust this PEM CA certificate
  --chunk-size <size>        Upload in chunks of this size (default: one streamed request)
  --retries <n>              Retries for failed requests and blobs (default ${DEFAULT_RETRIES})

General:
  --dry-run                  Print the plan and the Dockerfile; write nothing
  --json                     Print a JSON summary on stdout
  --no-cache                 Do not use the layer cache, which lets a push skip its
                             hashing pass for layers built before (~/.cache/imgmkr)
  --quiet, -q                Print errors only
  --verbose, -v              Trace registry requests (never credentials)
  --help, -h                 Show this help
  --version, -V              Show the version

Examples:
  imgmkr --layer-sizes 1GB,512MB,10KB --seed 7 test/core:v1
  imgmkr --layer-sizes 2GB --mock-fs --target-files 5000 --builder podman test/tree:v1
  imgmkr --layer-sizes 1GB,10MB --mock-fs --output oci:/tmp/img --output oci-archive:/tmp/img.tar t/n:1
  imgmkr --layer-sizes 200MB,1MB --output push localhost:5000/t/p:1
  imgmkr --layer-sizes 100MB --platform linux/amd64,linux/arm64 --output oci:/tmp/multi t/multi:1

Exit codes: 0 ok, 1 run-time failure, 2 bad usage, 130 SIGINT, 143 SIGTERM.
`;

const OPTIONS = {
  "layer-sizes": { type: "string" },
  "tmpdir-prefix": { type: "string" },
  "max-concurrent": { type: "string" },
  "mock-fs": { type: "boolean" },
  "max-depth": { type: "string" },
  "target-files": { type: "string" },
  seed: { type: "string" },
  builder: { type: "string" },
  platform: { type: "string" },
  "dry-run": { type: "boolean" },
  quiet: { type: "boolean", short: "q" },
  verbose: { type: "boolean", short: "v" },
  output: { type: "string", multiple: true },
  compression: { type: "string" },
  "compression-level": { type: "string" },
  entropy: { type: "string" },
  "share-layers": { type: "boolean" },
  json: { type: "boolean" },
  "no-cache": { type: "boolean" },
  "chunk-size": { type: "string" },
  username: { type: "string" },
  "password-stdin": { type: "boolean" },
  "plain-http": { type: "boolean" },
  "ca-cert": { type: "string" },
  retries: { type: "string" },
  help: { type: "boolean", short: "h" },
  version: { type: "boolean", short: "V" },
} as const;

const HINT = "run 'imgmkr --help' for usage";

function usage(message: string): never {
  throw new UsageError(message, { hint: HINT });
}

/** Joins `--flag value` into `--flag=value` when the value starts with '-', so `-1KB` reaches the size parser. */
function joinDashValues(args: string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    const name = a.startsWith("--") ? a.slice(2) : undefined;
    const opt = name && !name.includes("=") ? OPTIONS[name as keyof typeof OPTIONS] : undefined;
    const next = args[i + 1];
    if (
      opt?.type === "string" && next !== undefined && next.startsWith("-") && !isKnownFlag(next)
    ) {
      out.push(`${a}=${next}`);
      i++;
    } else {
      out.push(a);
    }
  }
  return out;
}

function isKnownFlag(arg: string): boolean {
  if (arg.startsWith("--")) return arg.slice(2).split("=")[0] in OPTIONS;
  return Object.values(OPTIONS).some((o) => "short" in o && `-${o.short}` === arg);
}

function wholeNumber(flag: string, text: string, min: number, max: number): number {
  if (!/^\d+$/.test(text.trim())) {
    usage(`Cannot use ${flag} '${text}': expected a whole number from ${min} to ${max}`);
  }
  const n = Number(text.trim());
  if (n < min || n > max) usage(`Cannot use ${flag} ${text}: it must be from ${min} to ${max}`);
  return n;
}

function sizeFlag(flag: string, text: string): number {
  try {
    return parseSize(text);
  } catch (e) {
    usage(`${flag}: ${(e as Error).message}`);
  }
}

function parseOutput(text: string): Output {
  if (text === "build" || text === "load" || text === "push") return { kind: text };
  const m = /^(oci|oci-archive):(.+)$/.exec(text);
  if (m) return m[1] === "oci" ? { kind: "oci", dir: m[2] } : { kind: "oci-archive", file: m[2] };
  usage(
    `Cannot use --output '${text}': expected build, oci:<dir>, oci-archive:<file>, load or push`,
  );
}

function checkTmpdir(dir: string): void {
  let st: Deno.FileInfo;
  try {
    st = Deno.statSync(dir);
  } catch {
    usage(
      `Cannot use --tmpdir-prefix '${dir}': it does not exist; create it or pick an existing directory`,
    );
  }
  if (!st.isDirectory) usage(`Cannot use --tmpdir-prefix '${dir}': it is not a directory`);
  try {
    accessSync(dir, fsConstants.W_OK | fsConstants.X_OK);
    // Deno's accessSync checks mode bits only, so root passes on a read-only mount:
    // create (and at once remove) an empty probe dir to know for sure.
    Deno.removeSync(Deno.makeTempDirSync({ dir, prefix: ".imgmkr-probe-" }));
  } catch {
    usage(
      `Cannot use --tmpdir-prefix '${dir}': it is not writable; pick a directory you can write to`,
    );
  }
}

/** Default parent of the build dir: `TMPDIR`, else the platform's temp dir. */
export function defaultTmpdir(): string {
  return Deno.env.get("TMPDIR") || Deno.env.get("TEMP") || Deno.env.get("TMP") || "/tmp";
}

/**
 * Parses and validates the command line. Nothing is written.
 *
 * @throws {UsageError} for any bad flag, value or reference.
 */
export function parseCommand(argv: string[]): Command {
  let parsed;
  try {
    parsed = parseArgs({
      args: joinDashValues(argv),
      options: OPTIONS,
      allowPositionals: true,
      strict: true,
    });
  } catch (e) {
    usage(`${(e as Error).message.split(". ")[0].replace(/\.$/, "")}`);
  }
  const v = parsed.values;
  if (v.help) return { kind: "help" };
  if (v.version) return { kind: "version" };

  if (v["layer-sizes"] === undefined) {
    usage("Missing --layer-sizes: give a comma list such as --layer-sizes 512KB,100MB");
  }
  let sizes: number[];
  try {
    sizes = parseSizeList(v["layer-sizes"]);
  } catch (e) {
    usage(`--layer-sizes: ${(e as Error).message}`);
  }

  if (parsed.positionals.length !== 1) {
    usage(
      parsed.positionals.length === 0
        ? "Missing image reference: give <repo[:tag]>, e.g. test/core:v1"
        : `Expected one image reference, got ${parsed.positionals.length}: ${
          parsed.positionals.join(" ")
        }`,
    );
  }
  let reference: Reference;
  try {
    reference = parseReference(parsed.positionals[0]);
  } catch (e) {
    usage((e as Error).message);
  }

  const outputs = (v.output ?? ["build"]).map(parseOutput);
  const native = outputs.filter((o) => o.kind !== "build");
  if (outputs.some((o) => o.kind === "build") && outputs.length > 1) {
    usage(
      "--output build cannot be combined with other outputs; use native outputs (oci:, oci-archive:, load, push) together",
    );
  }
  for (const kind of ["load", "push"] as const) {
    if (outputs.filter((o) => o.kind === kind).length > 1) usage(`--output ${kind} is given twice`);
  }

  const mockFs = v["mock-fs"] ?? false;
  if (!mockFs && v["max-depth"] !== undefined) usage("--max-depth needs --mock-fs");
  if (!mockFs && v["target-files"] !== undefined) usage("--target-files needs --mock-fs");
  const maxDepth = v["max-depth"] !== undefined
    ? wholeNumber("--max-depth", v["max-depth"], 0, MAX_MAX_DEPTH)
    : DEFAULT_MAX_DEPTH;
  const targetFiles = v["target-files"] !== undefined
    ? wholeNumber("--target-files", v["target-files"], 1, 10_000_000)
    : undefined;
  if (targetFiles !== undefined) {
    const small = sizes.findIndex((s) => s < targetFiles);
    if (small !== -1) {
      usage(
        `--target-files ${targetFiles}: layer ${small + 1} is only ${sizes[small]} bytes, ` +
          `too small for ${targetFiles} non-empty files; lower --target-files or raise the size`,
      );
    }
  }

  const maxConcurrent = v["max-concurrent"] !== undefined
    ? wholeNumber("--max-concurrent", v["max-concurrent"], 1, 1024)
    : DEFAULT_MAX_CONCURRENT;

  const seedDrawn = v.seed === undefined;
  const seed = v.seed !== undefined
    ? wholeNumber("--seed", v.seed, 0, MAX_SEED)
    : crypto.getRandomValues(new Uint32Array(1))[0];

  let builder: BuilderName | undefined;
  if (v.builder !== undefined) {
    if (!isBuilderName(v.builder)) {
      usage(`Unknown --builder '${v.builder}': use one of ${BUILDERS.join(", ")}`);
    }
    builder = v.builder;
  }

  let platforms: Platform[];
  try {
    platforms = (v.platform ?? DEFAULT_PLATFORM).split(",").map(parsePlatform);
  } catch (e) {
    usage(`--platform: ${(e as Error).message}`);
  }
  const names = platforms.map(formatPlatform);
  if (new Set(names).size !== names.length) {
    usage(`--platform lists a platform twice: ${v.platform}`);
  }
  if (platforms.length > 1 && native.length === 0) {
    usage(
      "Several --platform values need a native output: add --output oci:<dir>, oci-archive:<file> or push",
    );
  }
  if (platforms.length > 1 && outputs.some((o) => o.kind === "load")) {
    usage("--output load takes one --platform: an engine's image store holds one platform per tag");
  }
  if (v["share-layers"] && platforms.length < 2) {
    usage("--share-layers needs several --platform values");
  }

  const compression = (v.compression ?? "gzip") as Compression;
  if (!["gzip", "zstd", "none"].includes(compression)) {
    usage(`Unknown --compression '${v.compression}': use gzip, zstd or none`);
  }
  let compressionLevel: number | undefined;
  if (v["compression-level"] !== undefined) {
    if (compression === "none") usage("--compression-level needs --compression gzip or zstd");
    compressionLevel = compression === "gzip"
      ? wholeNumber("--compression-level", v["compression-level"], 0, 9)
      : wholeNumber("--compression-level", v["compression-level"], 1, 19);
  }
  const entropy = v.entropy !== undefined ? wholeNumber("--entropy", v.entropy, 0, 100) : 100;

  const pushing = outputs.some((o) => o.kind === "push");
  for (
    const flag of [
      "chunk-size",
      "username",
      "password-stdin",
      "plain-http",
      "ca-cert",
      "retries",
    ] as const
  ) {
    if (v[flag] !== undefined && !pushing) usage(`--${flag} needs --output push`);
  }
  if (v["plain-http"] && v["ca-cert"] !== undefined) {
    usage("--plain-http and --ca-cert contradict each other: a CA is only used over HTTPS");
  }
  if (v["password-stdin"] && v.username === undefined) usage("--password-stdin needs --username");
  if (v.username !== undefined && !v["password-stdin"]) {
    usage("--username needs --password-stdin (passwords are never taken as flags)");
  }
  if (v["ca-cert"] !== undefined) {
    try {
      Deno.statSync(v["ca-cert"]);
    } catch {
      usage(`Cannot use --ca-cert '${v["ca-cert"]}': no such file`);
    }
  }
  const push: PushFlags = {
    chunkSize: v["chunk-size"] !== undefined
      ? sizeFlag("--chunk-size", v["chunk-size"])
      : undefined,
    username: v.username,
    passwordStdin: v["password-stdin"] ?? false,
    plainHttp: v["plain-http"] ?? false,
    caCert: v["ca-cert"],
    retries: v.retries !== undefined
      ? wholeNumber("--retries", v.retries, 0, 100)
      : DEFAULT_RETRIES,
  };

  const tmpdirPrefix = v["tmpdir-prefix"] ?? defaultTmpdir();
  checkTmpdir(tmpdirPrefix);

  return {
    kind: "run",
    config: {
      sizes,
      reference,
      tmpdirPrefix,
      maxConcurrent,
      mockFs,
      maxDepth,
      targetFiles,
      seed,
      seedDrawn,
      builder,
      platforms,
      dryRun: v["dry-run"] ?? false,
      quiet: v.quiet ?? false,
      verbose: v.verbose ?? false,
      outputs,
      compression,
      compressionLevel,
      entropy,
      shareLayers: v["share-layers"] ?? false,
      json: v.json ?? false,
      cache: !(v["no-cache"] ?? false),
      push,
    },
  };
}

/** The layer plans for one platform (distinct content per platform unless shared). */
export function plansFor(config: Config, platform: Platform): LayerPlan[] {
  try {
    return planLayers({
      sizes: config.sizes,
      seed: config.seed,
      mockFs: config.mockFs,
      maxDepth: config.maxDepth,
      targetFiles: config.targetFiles,
      variant: config.platforms.length > 1 && !config.shareLayers ? formatPlatform(platform) : "",
    });
  } catch (e) {
    if (e instanceof RangeError) usage(e.message);
    throw e;
  }
}

/** Options for {@linkcode main}. */
export interface MainOptions {
  /**
   * Where results (reference, digest, JSON) go.
   * @default {write to stdout}
   */
  stdout?: (text: string) => void;
  /**
   * Where errors go.
   * @default {write to stderr}
   */
  stderr?: (text: string) => void;
}

const encoder = new TextEncoder();
const SIGNALS: readonly Deno.Signal[] = Deno.build.os === "windows"
  ? ["SIGINT"]
  : ["SIGINT", "SIGTERM"];

/**
 * Runs imgmkr with `argv` and returns the exit code. This is the one place
 * errors are caught and turned into messages and codes.
 */
export async function main(argv: string[], options: MainOptions = {}): Promise<number> {
  const stdout = options.stdout ?? ((t: string) => writeAll(Deno.stdout, t));
  const stderr = options.stderr ?? ((t: string) => writeAll(Deno.stderr, t));
  const controller = new AbortController();
  const listeners = SIGNALS.map((sig) => {
    const fn = () => controller.abort(new InterruptedError(sig as "SIGINT" | "SIGTERM"));
    Deno.addSignalListener(sig, fn);
    return [sig, fn] as const;
  });
  let progress = new Progress({ quiet: true });
  try {
    const command = parseCommand(argv);
    if (command.kind === "help") {
      stdout(HELP);
      return 0;
    }
    if (command.kind === "version") {
      stdout(`imgmkr ${VERSION}\n`);
      return 0;
    }
    progress = new Progress({ quiet: command.config.quiet });
    await execute(command.config, { signal: controller.signal, progress, stdout });
    return 0;
  } catch (error) {
    progress.close();
    const reason = controller.signal.aborted ? controller.signal.reason : error;
    if (reason instanceof InterruptedError) {
      stderr(`imgmkr: interrupted by ${reason.signal}; temp files removed\n`);
      return reason.code;
    }
    if (reason instanceof UsageError) {
      stderr(`imgmkr: ${reason.message}\n${reason.hint ? `hint: ${reason.hint}\n` : ""}`);
      return EXIT_USAGE;
    }
    const message = reason instanceof Error ? reason.message : String(reason);
    stderr(`imgmkr: error: ${message}\n`);
    return EXIT_FAILURE;
  } finally {
    for (const [sig, fn] of listeners) Deno.removeSignalListener(sig, fn);
  }
}

function writeAll(file: { writeSync(p: Uint8Array): number }, text: string): void {
  const bytes = encoder.encode(text);
  for (let off = 0; off < bytes.length;) off += file.writeSync(bytes.subarray(off));
}

/** Context shared by the stages of one run. */
interface ExecuteContext {
  signal: AbortSignal;
  progress: Progress;
  stdout: (text: string) => void;
}

async function execute(config: Config, ctx: ExecuteContext): Promise<void> {
  const { progress } = ctx;
  const tag = formatReference(config.reference);
  const plans = config.platforms.map((p) => plansFor(config, p));
  progress.stage(
    `Validated: ${config.sizes.length} layer${config.sizes.length === 1 ? "" : "s"}, ` +
      `${formatSize(config.sizes.reduce((a, b) => a + b, 0))}, reference ${tag}`,
  );
  progress.info(
    config.seedDrawn
      ? `seed ${config.seed} (drawn at random; pass --seed ${config.seed} to reproduce)`
      : `seed ${config.seed}`,
  );
  if (config.outputs[0].kind !== "build") {
    // The native writer is loaded only when used: the Dockerfile path starts faster without it.
    const image = await import("./image.ts");
    const native = config.outputs.filter((o): o is NativeOutput => o.kind !== "build");
    if (config.dryRun) {
      ctx.stdout(
        image.describeNativePlan(
          config.platforms,
          plans,
          image.effectiveCompression(native, config.compression),
        ),
      );
      return;
    }
    const summary = await image.runNative({
      reference: config.reference,
      platforms: config.platforms,
      plans,
      seed: config.seed,
      entropy: config.entropy,
      compression: config.compression,
      compressionLevel: config.compressionLevel,
      outputs: native,
      maxConcurrent: config.maxConcurrent,
      builder: config.builder,
      registry: await registryOptions(config, progress),
      retries: config.push.retries,
      cache: layerCache(config),
      createdBy: `imgmkr ${VERSION}`,
      signal: ctx.signal,
      progress,
    });
    const { printed, ...json } = summary;
    ctx.stdout(config.json ? `${JSON.stringify(json, null, 2)}\n` : `${printed}\n`);
    return;
  }
  if (config.dryRun) {
    ctx.stdout(describePlan(plans[0]));
    return;
  }
  let builder: BuilderName;
  try {
    builder = detectBuilder({ requested: config.builder });
  } catch (e) {
    throw new UsageError((e as Error).message, { hint: HINT });
  }
  progress.stage(`Checking ${builder}`);
  await checkDaemon(builder, { signal: ctx.signal });
  const result = await runBuild({
    plans: plans[0],
    seed: config.seed,
    entropy: config.entropy,
    builder,
    tag,
    platform: formatPlatform(config.platforms[0]),
    tmpdirPrefix: config.tmpdirPrefix,
    maxConcurrent: config.maxConcurrent,
    signal: ctx.signal,
    progress,
  });
  progress.stage(`Built ${tag}`);
  if (config.json) {
    ctx.stdout(`${JSON.stringify(buildSummary(config, plans[0], builder, result), null, 2)}\n`);
  } else {
    ctx.stdout(`${tag}\n`);
  }
}

/**
 * The layer cache, unless `--no-cache` is given or no cache directory is
 * known. Its salt holds every version that can change a layer's bytes.
 */
function layerCache(config: Config): LayerCache | undefined {
  const dir = config.cache ? defaultCacheDir() : undefined;
  return dir
    ? new LayerCache({ dir, salt: `imgmkr ${VERSION}, deno ${Deno.version.deno}` })
    : undefined;
}

/** Longest password accepted on stdin: a token is a few KB; more is a mistake (e.g. a piped file). */
const MAX_PASSWORD_BYTES = 64 * 1024;

/**
 * Reads the password for `--password-stdin`: all of stdin, without the
 * trailing newline that `echo` or a file adds, as `docker login` does.
 *
 * @throws {UsageError} when stdin is empty or too long.
 */
async function readPasswordStdin(
  stdin: ReadableStream<Uint8Array> = Deno.stdin.readable,
): Promise<string> {
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of stdin) {
    size += chunk.length;
    if (size > MAX_PASSWORD_BYTES) {
      usage(
        `--password-stdin: stdin holds more than ${MAX_PASSWORD_BYTES} bytes; pipe only the password`,
      );
    }
    chunks.push(chunk);
  }
  const bytes = new Uint8Array(size);
  let off = 0;
  for (const c of chunks) {
    bytes.set(c, off);
    off += c.length;
  }
  const password = new TextDecoder().decode(bytes).replace(/\r?\n$/, "");
  if (password === "") {
    usage('--password-stdin: stdin is empty; pipe the password, e.g. echo "$TOKEN" | imgmkr ...');
  }
  return password;
}

/** The registry options of a push run; reads the password from stdin when asked to. */
async function registryOptions(
  config: Config,
  progress: Progress,
): Promise<Omit<RegistrySinkOptions, "reference">> {
  if (!config.outputs.some((o) => o.kind === "push")) return {};
  const { push } = config;
  return {
    credential: push.passwordStdin
      ? { username: push.username, password: await readPasswordStdin(), source: "--username" }
      : undefined,
    plainHttp: push.plainHttp,
    caCert: push.caCert,
    chunkSize: push.chunkSize,
    // The log lines never carry credentials or tokens: see RegistrySinkOptions.log.
    log: config.verbose ? (line) => progress.info(line) : undefined,
  };
}

function buildSummary(
  config: Config,
  plans: LayerPlan[],
  builder: BuilderName,
  result: BuildResult,
) {
  return {
    reference: formatReference(config.reference),
    output: "build",
    builder,
    imageId: result.imageId,
    platform: formatPlatform(config.platforms[0]),
    seed: config.seed,
    layers: plans.map((p) => ({ index: p.index, fileBytes: p.size, fileCount: p.files.length })),
    timings: result.timings,
  };
}
