/**
 * `sarde lazy-serve SPEC` (hidden): the detached server of a lazy pull (lib/vm/lazy_pull.ts),
 * started by `sarde pull --lazy` and never by hand. It prints one JSON line on stdout once the VM
 * can start (or why not), then runs until the image is a normal import and no VM reads it.
 *
 * @module
 */

import type { Command } from "commander";
import { type LazyPullSpec, serveLazyPull } from "../../lib/vm/lazy_pull.ts";
import { fail } from "../../lib/util/errors.ts";
import { out } from "../output.ts";

/** Adds the hidden `lazy-serve` to `program`. */
export function lazyServeCommand(program: Command): Command {
  return program.command("lazy-serve", { hidden: true })
    .description("internal: the server of `sarde pull --lazy`")
    .argument("<spec>", "the pull, as JSON")
    .action(async (text: string) => {
      let spec: LazyPullSpec;
      try {
        spec = JSON.parse(text);
      } catch {
        throw fail("usage", "lazy-serve takes the JSON that sarde pull --lazy gives it");
      }
      await serveLazyPull(spec, (line) => {
        out(JSON.stringify(line) + "\n");
        // The pull reads one line and goes: nothing more may go to a pipe nobody reads.
        Deno.stdout.close();
      });
    });
}
