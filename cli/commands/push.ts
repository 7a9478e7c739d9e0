/**
 * `sarde push`: upload a local image to a registry.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { info } from "../../lib/util/log.ts";
import { addTransferOptions, type CommonCli, settings } from "../common.ts";
import { out, summary } from "../output.ts";
import { addSigningOptions, signing, type SigningCli } from "../signing.ts";

/** Adds `push` to `program`. */
export function pushCommand(program: Command): Command {
  return addSigningOptions(addTransferOptions(
    program.command("push")
      .description("upload a local image to a registry; prints the manifest digest")
      .argument("<image>", "local image name, e.g. registry.example.org/sardines/debian12:latest")
      .option("-t, --target <ref>", "upload to this reference instead of <image>"),
  )).addHelpText(
    "after",
    "\nExample:\n  sarde push --sign-by-sigstore-private-key signing.key --sign-passphrase-file pass.txt " +
      "registry.example.org/sardines/debian12:latest",
  ).action(async (image: string, o: CommonCli & SigningCli & { target?: string }) => {
    const r = await sarde.push(image, { ...settings(o), ...await signing(o), target: o.target });
    info(summary("pushed", r));
    out(`${r.digest}\n`);
  });
}
