/**
 * `sarde import`: define a libvirt VM from a local image.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { addImportOptions, type ImportCli, importSettings, ocidirOption } from "../common.ts";
import { printImported } from "../output.ts";

/** Adds `import` to `program`. */
export function importCommand(program: Command): Command {
  return addImportOptions(
    program.command("import")
      .description("define a libvirt VM from a local image (idempotent); prints the VM name")
      .argument("<image>", "local image name")
      .addOption(ocidirOption())
      .option("-n, --name <name>", "VM name (default: the image ID)")
      .option("--print-uuid", "print the VM's UUID instead of its name"),
  ).action(async (image: string, o: ImportCli) => {
    printImported(await sarde.importVm(image, importSettings(o)), o);
  });
}
