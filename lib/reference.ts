/**
 * Image references (`[registry[:port]/]repo[:tag]`), validated with the rules
 * of docker's reference grammar.
 *
 * @module
 */

/** The registry that docker assumes when a reference names none. */
export const DOCKER_HUB = "docker.io";
/** Where Docker Hub's distribution API is actually served. */
export const DOCKER_HUB_ENDPOINT = "registry-1.docker.io";
/** The tag used when a reference has none. */
export const DEFAULT_TAG = "latest";
/** docker refuses repository names (with the registry) longer than this. */
const MAX_NAME_LENGTH = 255;

const DOMAIN_COMPONENT = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
const DOMAIN_RE = new RegExp(
  `^(?:${DOMAIN_COMPONENT}(?:\\.${DOMAIN_COMPONENT})*|\\[[0-9a-fA-F:.]+\\])(?::[0-9]+)?$`,
);
const PATH_COMPONENT_RE = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const TAG_RE = /^[\w][\w.-]{0,127}$/;

/** A parsed, validated image reference. */
export interface Reference {
  /** Registry host (and port) as written, or `docker.io` when none was given. */
  registry: string;
  /** Repository path; for Docker Hub single names `library/` is prepended. */
  repository: string;
  /** The tag, `latest` when none was given. */
  tag: string;
  /** The name as the user wrote it, without the tag (e.g. `test/core`). */
  name: string;
}

/**
 * Parses and validates a reference the way `docker build -t` would.
 *
 * @throws {SyntaxError} naming what is wrong with the reference.
 */
export function parseReference(text: string): Reference {
  const fail = (why: string): never => {
    throw new SyntaxError(`Cannot use image reference '${text}': ${why}`);
  };
  if (text === "") fail("it is empty");
  if (text.includes("@")) fail("digests (@sha256:…) cannot be built; give a tag such as repo:v1");
  // Split off a tag: a ':' after the last '/'.
  const slash = text.lastIndexOf("/");
  const colon = text.indexOf(":", slash + 1);
  let name = text;
  let tag = DEFAULT_TAG;
  if (colon !== -1) {
    name = text.slice(0, colon);
    tag = text.slice(colon + 1);
    if (tag.includes(":")) fail("it has more than one ':' after the last '/'");
    if (!TAG_RE.test(tag)) {
      fail("the tag must be 1 to 128 characters from [A-Za-z0-9_.-] and not start with '.' or '-'");
    }
  }
  if (name.length > MAX_NAME_LENGTH) fail(`the name is longer than ${MAX_NAME_LENGTH} characters`);
  const parts = name.split("/");
  let registry = DOCKER_HUB;
  const first = parts[0];
  if (
    parts.length > 1 &&
    (first.includes(".") || first.includes(":") || first === "localhost" ||
      first !== first.toLowerCase())
  ) {
    if (!DOMAIN_RE.test(first)) fail(`'${first}' is not a valid registry host[:port]`);
    registry = first;
    parts.shift();
  }
  if (parts.length === 0 || parts.some((p) => p === "")) fail("a path component is empty");
  for (const part of parts) {
    if (!PATH_COMPONENT_RE.test(part)) {
      fail(
        part !== part.toLowerCase()
          ? "the repository name must be lowercase"
          : `'${part}' must be lowercase letters and digits, separated by '.', '_', '__' or '-'`,
      );
    }
  }
  let repository = parts.join("/");
  if (registry === "index.docker.io") registry = DOCKER_HUB;
  if (registry === DOCKER_HUB && parts.length === 1) repository = `library/${repository}`;
  return { registry, repository, tag, name };
}

/** Formats a reference as `name:tag`, the form passed to `docker build -t`. */
export function formatReference(ref: Reference): string {
  return `${ref.name}:${ref.tag}`;
}

/** The host to talk to for a registry: Docker Hub's API lives elsewhere. */
export function registryEndpoint(registry: string): string {
  return registry === DOCKER_HUB ? DOCKER_HUB_ENDPOINT : registry;
}
