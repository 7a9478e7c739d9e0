/**
 * `sarde getconfig`: print the VM config stored in a local image.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { warn } from "../../lib/util/log.ts";
import { type CommonCli, ocidirOption, settings } from "../common.ts";
import { out } from "../output.ts";

/** Adds `getconfig` to `program`. */
export function getconfigCommand(program: Command): Command {
  return program.command("getconfig")
    .description("print the VM config (users, services) stored in a local image, as JSON")
    .argument("<image>", "local image name")
    .addOption(ocidirOption())
    .action(async (image: string, o: CommonCli) => {
      const c = await sarde.getConfig(image, settings(o));
      if (c === undefined) {
        warn(`${image} has no VM config`);
        return;
      }
      out(JSON.stringify(c, null, 2) + "\n");
    });
}
