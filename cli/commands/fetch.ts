/**
 * `sarde fetch`: download an image from a registry into the local store.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { info } from "../../lib/util/log.ts";
import { addTransferOptions, addTrustOptions, type CommonCli, settings } from "../common.ts";
import { out, summary } from "../output.ts";

/** Adds `fetch` to `program`. */
export function fetchCommand(program: Command): Command {
  return addTrustOptions(addTransferOptions(
    program.command("fetch")
      .description(
        "download an image from a registry into the local store; prints the manifest digest",
      )
      .argument("<image>", "image reference, e.g. registry.example.org/sardines/debian12:latest")
      .option("-s, --source <ref>", "download from this reference instead, store under <image>"),
  )).action(async (image: string, o: CommonCli & { source?: string }) => {
    const r = await sarde.fetch(image, { ...settings(o), source: o.source });
    info(summary("fetched", r));
    out(`${r.digest}\n`);
  });
}
