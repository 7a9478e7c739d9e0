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
import { formatBytes } from "../../lib/util/progress.ts";

/** Adds `list` to `program`. */
export function listCommand(program: Command): Command {
  return program.command("list")
    .alias("ls")
    .description(
      "list the images in the local store, with the state of the VMs imported from them " +
        "(and the progress of lazy pulls)",
    )
    .addOption(ocidirOption())
    .addOption(vmdirOption())
    .addOption(connectOption())
    .addOption(choiceOption("--format <format>", "output format: text or json", ["text", "json"]))
    .action(async (o: CommonCli & { format?: string }) => {
      const entries = await sarde.list(settings(o));
      if (o.format === "json") return out(JSON.stringify(entries, null, 2) + "\n");
      // Lazy pulls in progress (`pull --lazy`): one line each under the table.
      const lazy = entries.flatMap((e) =>
        e.lazy
          ? [
            `${e.lazy.name}: lazy pull ${e.lazy.phase}, ${
              e.lazy.total ? Math.floor(e.lazy.present / e.lazy.total * 100) : 100
            } % (${formatBytes(e.lazy.present)} of ${formatBytes(e.lazy.total)})${
              e.lazy.problem === undefined
                ? ""
                : `: ${e.lazy.phase === "failed" ? "" : "retrying after "}${e.lazy.problem}`
            }\n`,
          ]
          : []
      );
      out(formatImageTable(entries) + lazy.join(""));
    });
}
