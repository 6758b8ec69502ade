/**
 * Runs the real `main.ts` in a child Deno process, the way a user would, and
 * collects its exit code, stdout and stderr. Optionally sends a signal to the
 * child once its stderr shows some text (e.g. "Generating"), to test Ctrl-C.
 *
 * @module
 */

/** Absolute path of the CLI entry point. */
export const MAIN = new URL("../../main.ts", import.meta.url).pathname;

/** A signal to send to the child once `when` matches its stderr so far. */
export interface SignalAfter {
  /** The signal to send. */
  signal: Deno.Signal;
  /** Sent as soon as this returns true for the stderr seen so far. */
  when: (stderr: string) => boolean;
}

/** Options for {@linkcode runCli}. */
export interface RunCliOptions {
  /**
   * Environment changes: a string sets a variable, `undefined` removes it.
   * Everything else is inherited.
   * @default {{}}
   */
  env?: Record<string, string | undefined>;
  /**
   * Working directory of the child.
   * @default {Deno.cwd()}
   */
  cwd?: string;
  /**
   * Send a signal once stderr matches.
   * @default {undefined}
   */
  signalAfter?: SignalAfter;
  /**
   * Text fed to the child's stdin (then closed); stdin is /dev/null when unset.
   * @default {undefined}
   */
  stdin?: string;
  /**
   * Kill the child (SIGKILL) and fail after this long.
   * @default {300_000}
   */
  timeoutMs?: number;
}

/** What the child did. */
export interface CliResult {
  /** Exit code. */
  code: number;
  /** Everything printed on stdout. */
  stdout: string;
  /** Everything printed on stderr. */
  stderr: string;
  /** True if the `signalAfter` signal was sent. */
  signalled: boolean;
}

/**
 * The layer cache of every imgmkr the tests run, unless a test sets its own
 * `XDG_CACHE_HOME`: private to this test process, so tests never read or
 * fill the user's cache. Removed when the process ends.
 */
const CACHE_HOME = Deno.makeTempDirSync({ prefix: "imgmkr-test-cache-" });
globalThis.addEventListener("unload", () => Deno.removeSync(CACHE_HOME, { recursive: true }));

/** Runs `deno run -A main.ts ...args` and waits for it to exit. */
export async function runCli(args: string[], options: RunCliOptions = {}): Promise<CliResult> {
  const env: Record<string, string> = { ...Deno.env.toObject(), XDG_CACHE_HOME: CACHE_HOME };
  for (const [k, v] of Object.entries(options.env ?? {})) {
    if (v === undefined) delete env[k];
    else env[k] = v;
  }
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", "--no-lock", MAIN, ...args],
    env,
    clearEnv: true,
    cwd: options.cwd,
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (options.stdin !== undefined) {
    const w = child.stdin.getWriter();
    await w.write(new TextEncoder().encode(options.stdin));
    await w.close();
  }
  let signalled = false;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  }, options.timeoutMs ?? 300_000);
  const collect = async (
    stream: ReadableStream<Uint8Array>,
    onText?: (all: string) => void,
  ): Promise<string> => {
    const decoder = new TextDecoder();
    let all = "";
    for await (const chunk of stream) {
      all += decoder.decode(chunk, { stream: true });
      onText?.(all);
    }
    return all + decoder.decode();
  };
  const after = options.signalAfter;
  const [stdout, stderr, status] = await Promise.all([
    collect(child.stdout),
    collect(child.stderr, (all) => {
      if (after && !signalled && after.when(all)) {
        signalled = true;
        child.kill(after.signal);
      }
    }),
    child.status,
  ]);
  clearTimeout(timer);
  if (timedOut) {
    throw new Error(`imgmkr ${args.join(" ")} timed out; stderr:\n${stderr}`);
  }
  return { code: status.code, stdout, stderr, signalled };
}

/** Lists a directory's entry names, sorted (empty for an empty dir). */
export function listDir(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
}

/** Runs `fn` with a fresh empty temp directory, removed afterwards. */
export async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "imgmkr-test-" });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/**
 * Mounts a tmpfs of `size` (e.g. "8m") at a fresh directory, runs `fn`, and
 * unmounts it. Needs root (CI and this machine run tests as root).
 */
export async function withTmpfs<T>(
  size: string,
  fn: (dir: string) => Promise<T>,
  options: { readOnly?: boolean } = {},
): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "imgmkr-test-tmpfs-" });
  const opts = `${options.readOnly ? "ro," : ""}size=${size}`;
  const mount = await new Deno.Command("mount", {
    args: ["-t", "tmpfs", "-o", opts, "tmpfs", dir],
    stdout: "null",
    stderr: "piped",
  }).output();
  if (!mount.success) {
    await Deno.remove(dir);
    throw new Error(
      `mount -t tmpfs failed (tests must run as root): ${new TextDecoder().decode(mount.stderr)}`,
    );
  }
  try {
    return await fn(dir);
  } finally {
    await new Deno.Command("umount", { args: [dir], stdout: "null", stderr: "null" }).output();
    await Deno.remove(dir).catch(() => {});
  }
}

/** Writes an executable shell script `name` into `dir` and returns its path. */
export function writeScript(dir: string, name: string, body: string): string {
  const path = `${dir}/${name}`;
  Deno.writeTextFileSync(path, `#!/bin/sh\n${body}\n`);
  Deno.chmodSync(path, 0o755);
  return path;
}
