/**
 * `sarde list` (`ls`): the images in the local store and the VMs imported from them.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { formatImageTable } from "../../lib/oci/images.ts";
import { type CommonCli, connectOption, ocidirOption, settings, vmdirOption } from "../common.ts";
import { choiceOption } from "../options.ts";
import { out } from "../output.ts";

/** Adds `list` to `program`. */
export function listCommand(program: Command): Command {
  return program.command("list")
    .alias("ls")
    .description("list the images in the local store, with the state of the VMs imported from them")
    .addOption(ocidirOption())
    .addOption(vmdirOption())
    .addOption(connectOption())
    .addOption(choiceOption("--format <format>", "output format: text or json", ["text", "json"]))
    .action(async (o: CommonCli & { format?: string }) => {
      const entries = await sarde.list(settings(o));
      out(
        o.format === "json" ? JSON.stringify(entries, null, 2) + "\n" : formatImageTable(entries),
      );
    });
}
