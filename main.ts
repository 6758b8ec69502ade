#!/usr/bin/env -S deno run -A
/**
 * imgmkr: create mock OCI container images for testing image pull.
 *
 * ```sh
 * deno run -A jsr:@imgmkr/cli --layer-sizes 1GB,512MB,10KB --seed 7 test/core:v1
 * ```
 *
 * @module
 */

import { main } from "./lib/cli.ts";

if (import.meta.main) {
  Deno.exit(await main(Deno.args));
}
