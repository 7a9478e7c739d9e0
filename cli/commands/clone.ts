/**
 * `sarde clone`: a new VM with copy-on-write disks over a local image or a defined VM.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { info } from "../../lib/util/log.ts";
import {
  addImportOptions,
  addTransferOptions,
  addTrustOptions,
  type ImportCli,
  importSettings,
} from "../common.ts";
import { pathOption } from "../options.ts";
import { out } from "../output.ts";

/** Adds `clone` to `program`. */
export function cloneCommand(program: Command): Command {
  return addImportOptions(addTrustOptions(addTransferOptions(
    program.command("clone")
      .description(
        "make a new VM with copy-on-write disks from a local image or a defined VM; prints its name",
      )
      .argument("<source>", "local image name or libvirt VM name")
      .argument("<target>", "name of the new VM")
      .addOption(
        pathOption("--clonedir <dir>", "folder for the clone's overlays (default: the vmdir)"),
      )
      .option("--start", "start the clone")
      .option("--transient", "make a transient VM: started at once, gone when it stops")
      .option(
        "--lazy",
        "when <source> is no defined VM, pull it as `sarde pull --lazy` does first (the registry " +
          "options apply): the clone can start at once, reading the image over NBD while it downloads",
      ),
  ))).action(
    async (
      source: string,
      target: string,
      o: ImportCli & { clonedir?: string; start?: boolean; transient?: boolean; lazy?: boolean },
    ) => {
      const r = await sarde.clone(source, target, {
        ...importSettings(o),
        clonedir: o.clonedir,
        start: o.start,
        transient: o.transient,
        lazy: o.lazy,
      });
      info(`cloned ${r.base} into ${r.name} (${r.folder})`);
      out(`${r.name}\n`);
    },
  );
}
