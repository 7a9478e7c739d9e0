/**
 * `sarde prune`: remove leftovers, and old or surplus cached images and imported VMs.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { parseDuration } from "../../lib/util/config.ts";
import { info } from "../../lib/util/log.ts";
import { formatBytes } from "../../lib/util/progress.ts";
import { parseSize } from "../../lib/util/units.ts";
import { type CommonCli, connectOption, ocidirOption, settings, vmdirOption } from "../common.ts";
import { pathOption, valueOption } from "../options.ts";

/** The parsed values of `prune`. */
interface PruneCli extends CommonCli {
  clonedir?: string;
  olderThan?: number;
  keepBytes?: number;
  dryRun?: boolean;
}

/** Adds `prune` to `program`. */
export function pruneCommand(program: Command): Command {
  return program.command("prune")
    .description(
      "remove leftovers, and with --older-than/--keep-bytes cached images and imported VMs " +
        "that no defined VM uses, least recently used first",
    )
    .addOption(ocidirOption())
    .addOption(vmdirOption())
    .addOption(connectOption())
    .addOption(pathOption("--clonedir <dir>", "also look for leftover clones in this folder"))
    .addOption(
      valueOption(
        "--older-than <duration>",
        "remove what was not used for this long, e.g. 14d, 12h",
        (text, what) => parseDuration(text, what),
      ),
    )
    .addOption(
      valueOption(
        "--keep-bytes <size>",
        "then remove until cached images and imported VMs take at most this, e.g. 200GiB; " +
          "what is in use counts too (as the executor's cache-budget does), but never goes",
        parseSize,
      ),
    )
    .option("-n, --dry-run", "only say what would be removed")
    .action(async (o: PruneCli) => {
      const removed = await sarde.prune({
        ...settings(o),
        clonedirs: o.clonedir ? [o.clonedir] : [],
        olderThanMs: o.olderThan,
        keepBytes: o.keepBytes,
        dryRun: o.dryRun,
      });
      const bytes = removed.reduce((n, r) => n + r.bytes, 0);
      info(
        `${o.dryRun ? "would free" : "freed"} ${formatBytes(bytes)} in ${removed.length} item(s)`,
      );
    });
}
