/**
 * `sarde rm` (`remove`): remove cached images and the blobs only they needed.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { info } from "../../lib/util/log.ts";
import { formatBytes } from "../../lib/util/progress.ts";
import { type CommonCli, ocidirOption, settings } from "../common.ts";

/** Adds `rm` to `program`. */
export function rmCommand(program: Command): Command {
  return program.command("rm")
    .alias("remove")
    .description("remove cached images (a tag, or a digest) and the blobs only they needed")
    .argument("<image...>", "local image names")
    .addOption(ocidirOption())
    .action(async (images: string[], o: CommonCli) => {
      const s = settings(o);
      let total = 0;
      for (const image of images) {
        const r = await sarde.remove(image, s);
        info(`removed ${r.what} (${formatBytes(r.bytes)} freed)`);
        total += r.bytes;
      }
      if (images.length > 1) info(`${formatBytes(total)} freed`);
    });
}
