/**
 * Status and progress on stderr: live bars on a TTY, plain lines otherwise,
 * nothing but errors with `--quiet`. Colour only on a TTY without `NO_COLOR`.
 *
 * @module
 */

import { formatSize } from "./sizes.ts";

/** Redraw bars at most this often, so a fast layer does not flood the terminal. */
const REDRAW_INTERVAL_MS = 100;
/** Without a TTY, print a progress line at each of these fractions done. */
const PLAIN_STEPS = [0.25, 0.5, 0.75];
/** Without a TTY, smaller tasks get only their "done" line: quarter lines of a 10 KB layer are noise. */
const PLAIN_MIN_BYTES = 32 * 1024 * 1024;
/** Width of a bar in characters. */
const BAR_WIDTH = 24;

/** Options for {@linkcode Progress}. */
export interface ProgressOptions {
  /**
   * Print nothing but errors.
   * @default {false}
   */
  quiet?: boolean;
  /**
   * Draw live bars; when unset, true if stderr is a terminal.
   * @default {Deno.stderr.isTerminal()}
   */
  tty?: boolean;
  /**
   * Use colour; when unset, true on a TTY unless `NO_COLOR` is set.
   * @default {tty && !NO_COLOR}
   */
  color?: boolean;
  /**
   * Where text goes.
   * @default {write to stderr}
   */
  write?: (text: string) => void;
}

/** One tracked transfer, e.g. a layer being written. */
export interface ProgressTask {
  /** Adds `bytes` done. */
  advance(bytes: number): void;
  /** Marks the task finished, with an optional note (e.g. the digest). */
  done(note?: string): void;
}

const encoder = new TextEncoder();

/** Stage messages and per-task progress for one run. */
export class Progress {
  readonly #quiet: boolean;
  readonly #tty: boolean;
  readonly #color: boolean;
  readonly #write: (text: string) => void;
  readonly #bars: Bar[] = [];
  #drawn = 0;
  #lastDraw = 0;

  /** Creates a reporter; see {@linkcode ProgressOptions} for the defaults. */
  constructor(options: ProgressOptions = {}) {
    this.#quiet = options.quiet ?? false;
    this.#tty = options.tty ?? Deno.stderr.isTerminal();
    this.#color = options.color ?? (this.#tty && !Deno.env.get("NO_COLOR"));
    this.#write = options.write ?? ((t) => Deno.stderr.writeSync(encoder.encode(t)));
  }

  /** True with `--quiet`. */
  get quiet(): boolean {
    return this.#quiet;
  }

  /** Prints a stage heading such as "Generating 3 layers". */
  stage(message: string): void {
    this.#line(this.#paint("1;34", "==> ") + message);
  }

  /** Prints a detail line under the current stage. */
  info(message: string): void {
    this.#line(`    ${message}`);
  }

  /** Prints a warning (hidden by --quiet, which shows errors only). */
  warn(message: string): void {
    this.#line(this.#paint("33", "warning: ") + message);
  }

  /** Passes through output of a child process (builder logs), line by line. */
  passthrough(text: string): void {
    if (this.#quiet) return;
    this.#clearBars();
    this.#write(text);
    this.#redraw(true);
  }

  /** Starts tracking `total` bytes under `label`. */
  task(label: string, total: number): ProgressTask {
    const bar: Bar = { label, total, done: 0, start: performance.now(), step: 0, finished: false };
    if (!this.#quiet && this.#tty) this.#bars.push(bar);
    return {
      advance: (bytes) => {
        bar.done += bytes;
        if (this.#quiet) return;
        if (this.#tty) return this.#redraw(false);
        while (
          bar.total >= PLAIN_MIN_BYTES && bar.step < PLAIN_STEPS.length &&
          bar.done >= bar.total * PLAIN_STEPS[bar.step]
        ) {
          this.info(`${label}: ${Math.round(PLAIN_STEPS[bar.step++] * 100)}% ${rate(bar)}`);
        }
      },
      done: (note) => {
        bar.finished = true;
        bar.done = bar.total;
        if (this.#quiet) return;
        const secs = (performance.now() - bar.start) / 1000;
        const text = `${label}: done, ${formatSize(bar.total)} in ${secs.toFixed(1)}s${
          note ? ` ${note}` : ""
        }`;
        if (this.#tty) {
          this.#clearBars();
          this.#bars.splice(this.#bars.indexOf(bar), 1);
          this.#write(`    ${text}\n`);
          this.#redraw(true);
        } else {
          this.info(text);
        }
      },
    };
  }

  /** Removes any live bars from the screen (before an error is printed). */
  close(): void {
    this.#clearBars();
    this.#bars.length = 0;
  }

  #line(text: string): void {
    if (this.#quiet) return;
    this.#clearBars();
    this.#write(`${text}\n`);
    this.#redraw(true);
  }

  #paint(code: string, text: string): string {
    return this.#color ? `\x1b[${code}m${text}\x1b[0m` : text;
  }

  #clearBars(): void {
    if (this.#drawn > 0) {
      this.#write(`\x1b[${this.#drawn}A\x1b[J`);
      this.#drawn = 0;
    }
  }

  #redraw(force: boolean): void {
    if (!this.#tty || this.#bars.length === 0) return;
    const now = performance.now();
    if (!force && now - this.#lastDraw < REDRAW_INTERVAL_MS) return;
    this.#lastDraw = now;
    this.#clearBars();
    const lines = this.#bars.map((b) => {
      const frac = b.total > 0 ? Math.min(1, b.done / b.total) : 1;
      const fill = Math.round(frac * BAR_WIDTH);
      const bar = this.#paint("32", "█".repeat(fill)) + "░".repeat(BAR_WIDTH - fill);
      return `    ${b.label} ${bar} ${(frac * 100).toFixed(0).padStart(3)}% ${rate(b)}\n`;
    });
    this.#write(lines.join(""));
    this.#drawn = lines.length;
  }
}

interface Bar {
  label: string;
  total: number;
  done: number;
  start: number;
  step: number;
  finished: boolean;
}

function rate(b: Bar): string {
  const secs = (performance.now() - b.start) / 1000;
  const perSec = secs > 0 ? b.done / secs : 0;
  return `${formatSize(b.done)}/${formatSize(b.total)} ${formatSize(Math.round(perSec))}/s`;
}
