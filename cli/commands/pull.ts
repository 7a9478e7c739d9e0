/**
 * `sarde pull`: fetch an image and import it as a libvirt VM.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import {
  addImportOptions,
  addTransferOptions,
  addTrustOptions,
  type ImportCli,
  importSettings,
} from "../common.ts";
import { printImported } from "../output.ts";

/** Adds `pull` to `program`. */
export function pullCommand(program: Command): Command {
  return addImportOptions(
    addTrustOptions(addTransferOptions(
      program.command("pull")
        .description("fetch an image and import it as a libvirt VM; prints the VM name")
        .argument("<image>", "image reference")
        .option("-s, --source <ref>", "download from this reference instead, store under <image>")
        .option("-n, --name <name>", "VM name (default: the image ID)")
        .option("--print-uuid", "print the VM's UUID instead of its name")
        .addHelpText(
          "after",
          '\nExample:\n  name=$(sarde pull registry.example.org/sardines/debian12:latest) && virsh start "$name"',
        ),
    )),
  ).action(async (image: string, o: ImportCli & { source?: string }) => {
    printImported(await sarde.pull(image, { ...importSettings(o), source: o.source }), o);
  });
}
