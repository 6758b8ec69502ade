/**
 * Error classes that callers catch. Everything else uses the built-in
 * `TypeError`, `RangeError` or `SyntaxError`; `main.ts` maps them to exit codes.
 *
 * @module
 */

/** Exit code for a bad command line (flag, value or reference). */
export const EXIT_USAGE = 2;
/** Exit code for a failure at run time (builder, disk, registry). */
export const EXIT_FAILURE = 1;
/** Exit code after SIGINT (128 + 2), as shells report it. */
export const EXIT_SIGINT = 130;
/** Exit code after SIGTERM (128 + 15), as shells report it. */
export const EXIT_SIGTERM = 143;

/** Options for {@linkcode UsageError}. */
export interface UsageErrorOptions extends ErrorOptions {
  /**
   * A one-line hint printed under the error, e.g. "see imgmkr --help".
   * @default {undefined}
   */
  hint?: string;
}

/** A bad command line: printed as one line plus a hint, exit code 2. */
export class UsageError extends Error {
  /** Optional one-line hint shown below the message. */
  readonly hint?: string;
  /** Builds a usage error with an optional hint. */
  constructor(message: string, options: UsageErrorOptions = {}) {
    super(message, options);
    this.name = "UsageError";
    this.hint = options.hint;
  }
}

/** The run was stopped by a signal; `main.ts` exits with {@linkcode code}. */
export class InterruptedError extends Error {
  /** The signal that stopped the run. */
  readonly signal: "SIGINT" | "SIGTERM";
  /** Builds the error for the given signal. */
  constructor(signal: "SIGINT" | "SIGTERM") {
    super(`Interrupted by ${signal}`);
    this.name = "InterruptedError";
    this.signal = signal;
  }
  /** The process exit code for this signal (130 or 143). */
  get code(): number {
    return this.signal === "SIGINT" ? EXIT_SIGINT : EXIT_SIGTERM;
  }
}

/** Fields of a {@linkcode RegistryError}. */
export interface RegistryErrorOptions extends ErrorOptions {
  /** HTTP status, or 0 when no response arrived. */
  status: number;
  /** The first OCI error code of the response body, e.g. "BLOB_UNKNOWN". */
  code?: string;
  /** HTTP method of the failed request. */
  method: string;
  /** Request URL with any credentials removed. */
  url: string;
}

/** A registry request failed for good (after any retries). */
export class RegistryError extends Error {
  /** HTTP status, or 0 when no response arrived. */
  readonly status: number;
  /** OCI error code from the response body, if any. */
  readonly code?: string;
  /** HTTP method of the failed request. */
  readonly method: string;
  /** Request URL, without credentials. */
  readonly url: string;
  /** Builds the error; `message` should already say how to fix it. */
  constructor(message: string, options: RegistryErrorOptions) {
    super(message, options);
    this.name = "RegistryError";
    this.status = options.status;
    this.code = options.code;
    this.method = options.method;
    this.url = options.url;
  }
}

/** A builder (docker, podman, …) command failed or is unusable. */
export class BuilderError extends Error {
  /** Builds the error. */
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "BuilderError";
  }
}
