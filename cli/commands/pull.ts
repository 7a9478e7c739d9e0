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
        .option(
          "--lazy",
          "return as soon as the VM can start: its disks are read on demand over NBD from a " +
            "background server while the image downloads, then committed as a normal import " +
            "(one server per image and --vmdir; a plain pull of it waits for that; " +
            "sardinecake 0.4 gzip images are pulled in full)",
        )
        .addHelpText(
          "after",
          '\nExample:\n  name=$(sarde pull registry.example.org/sardines/debian12:latest) && virsh start "$name"' +
            '\n  name=$(sarde pull --lazy registry.example.org/sardines/win11:latest) && virsh start "$name"' +
            "\n\nWith --lazy, `sarde list` shows the download's progress; the VM is a normal import" +
            "\nonce complete (what the guest wrote so far is committed into its disks when it stops).",
        ),
    )),
  ).action(async (image: string, o: ImportCli & { source?: string; lazy?: boolean }) => {
    printImported(
      await sarde.pull(image, { ...importSettings(o), source: o.source, lazy: o.lazy }),
      o,
    );
  });
}
