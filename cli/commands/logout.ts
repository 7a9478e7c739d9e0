/**
 * `sarde logout`: forget stored credentials.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { SardeError } from "../../lib/util/errors.ts";
import { info } from "../../lib/util/log.ts";
import { parseRegistryHost } from "../../lib/oci/reference.ts";
import { pathOption } from "../options.ts";

/** Adds `logout` to `program`. */
export function logoutCommand(program: Command): Command {
  return program.command("logout")
    .description("forget stored credentials of a registry")
    .argument("[registry]", "registry host ('*' for all)")
    .option("-a, --all", "forget the credentials of every registry")
    .addOption(pathOption("--authfile <file>", "credentials file"))
    .action(async (registry: string | undefined, o: { all?: boolean; authfile?: string }) => {
      const authfile = o.authfile;
      if (!registry && !o.all) throw new SardeError("usage", "name a registry, or use --all");
      if (registry === "*" || o.all) {
        await sarde.logout({ all: true }, { authfile });
        info("removed all stored credentials");
        return;
      }
      const host = parseRegistryHost(registry!);
      if (!await sarde.logout(host, { authfile })) {
        throw new SardeError("not-found", `not logged in to ${host}`);
      }
      info(`removed the credentials for ${host}`);
    });
}
