/**
 * Finds a running Docker engine, or starts one, for tests that need it.
 * A test that needs the engine calls {@linkcode requireDocker}; if no engine
 * can be found or started the test fails (it never silently passes).
 *
 * @module
 */

/** Where a dockerd started by the tests listens. */
const TEST_SOCKET = "/tmp/imgmkr-test-docker.sock";
/** Times an engine that DOCKER_HOST (or the default socket) names is asked before another is started. */
const EXISTING_ENGINE_TRIES = 3;
/** How long to wait for a started dockerd to answer. */
const START_TIMEOUT_MS = 60_000;

/** Runs a command and returns its exit code, stdout and stderr as text. */
export async function run(
  cmd: string[],
  options: { env?: Record<string, string>; stdin?: Uint8Array; cwd?: string } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const child = new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    env: options.env,
    cwd: options.cwd,
    stdin: options.stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (options.stdin) {
    const w = child.stdin.getWriter();
    await w.write(options.stdin);
    await w.close();
  }
  const out = await child.output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

function existsSocket(path: string): boolean {
  try {
    return Deno.statSync(path).isSocket === true;
  } catch {
    return false;
  }
}

async function dockerAnswers(): Promise<boolean> {
  try {
    return (await run(["docker", "info", "--format", "{{.ServerVersion}}"])).code === 0;
  } catch {
    return false;
  }
}

let ready: Promise<void> | undefined;

/**
 * Makes sure `docker` reaches an engine: uses `DOCKER_HOST` or the default
 * socket if one answers, else starts `dockerd` on a test socket and sets
 * `DOCKER_HOST` for this process and its children.
 *
 * @throws {Error} when no engine answers and none can be started.
 */
export function requireDocker(): Promise<void> {
  ready ??= (async () => {
    // A busy engine can miss one `docker info`: ask a few times before starting another one.
    for (let i = 0; i < EXISTING_ENGINE_TRIES; i++) {
      if (await dockerAnswers()) return;
      if (!Deno.env.get("DOCKER_HOST") && !existsSocket("/var/run/docker.sock")) break;
      await new Promise((r) => setTimeout(r, 1000));
    }
    Deno.env.set("DOCKER_HOST", `unix://${TEST_SOCKET}`);
    if (await dockerAnswers()) return;
    const dataRoot = await Deno.makeTempDir({ prefix: "imgmkr-test-dockerd-" });
    new Deno.Command("dockerd", {
      args: [
        "--data-root",
        dataRoot,
        "--host",
        `unix://${TEST_SOCKET}`,
        "--iptables=false",
        "--bridge=none",
        "--pidfile",
        `${dataRoot}.pid`,
      ],
      stdout: "null",
      stderr: "null",
      stdin: "null",
    }).spawn().unref();
    const deadline = Date.now() + START_TIMEOUT_MS;
    while (Date.now() < deadline) {
      if (await dockerAnswers()) return;
      await new Promise((r) => setTimeout(r, 500));
    }
    throw new Error(
      "No Docker engine: `docker info` fails and dockerd did not start (install docker.io)",
    );
  })();
  return ready;
}
