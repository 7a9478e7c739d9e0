/**
 * `sarde login`: check credentials against a registry and store them.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { SardeError } from "../../lib/util/errors.ts";
import { info, warn } from "../../lib/util/log.ts";
import { parseRegistryHost } from "../../lib/oci/reference.ts";
import { promptLine, readStdinSecret } from "../../lib/util/terminal.ts";
import { addRegistryOptions, type CommonCli, settings } from "../common.ts";

/** Adds `login` to `program`. */
export function loginCommand(program: Command): Command {
  return addRegistryOptions(
    program.command("login")
      .description("check credentials against a registry and store them (like skopeo login)")
      .argument("<registry>", "registry host, e.g. registry.example.org or 127.0.0.1:5000")
      .option("-u, --username <user>", "user name (asked for when missing and interactive)")
      .option(
        "-p, --password <password>",
        "password (visible in the process list; prefer --password-stdin)",
      )
      .option("--password-stdin", "read the password from stdin")
      .addHelpText(
        "after",
        '\nExample:\n  echo "$TOKEN" | sarde login -u ci --password-stdin registry.example.org',
      ),
  ).action(
    async (
      registry: string,
      o: CommonCli & { username?: string; password?: string; passwordStdin?: boolean },
      cmd: Command,
    ) => {
      const s = settings(o);
      const host = parseRegistryHost(registry);
      if (o.password !== undefined && o.passwordStdin) {
        throw new SardeError("usage", "--password and --password-stdin exclude each other");
      }
      if (cmd.getOptionValueSource("password") === "cli") {
        warn("--password is visible to other users of this machine; prefer --password-stdin");
      }
      const username = o.username ?? await promptLine("Username: ");
      const password = o.password ??
        (o.passwordStdin ? await readStdinSecret() : await promptLine("Password: ", true));
      const file = await sarde.login(host, { username, password }, s);
      info(`Login succeeded: credentials for ${host} stored in ${file}`);
    },
  );
}
