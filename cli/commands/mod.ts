/**
 * The commands of `sarde`, one module each, in the order `sarde --help` lists them.
 *
 * @module
 */

import type { Command } from "commander";
import { cloneCommand } from "./clone.ts";
import { exportCommand } from "./export.ts";
import { fetchCommand } from "./fetch.ts";
import { generateSigstoreKeyCommand } from "./generate_sigstore_key.ts";
import { getconfigCommand } from "./getconfig.ts";
import { importCommand } from "./import.ts";
import { listCommand } from "./list.ts";
import { loginCommand } from "./login.ts";
import { logoutCommand } from "./logout.ts";
import { pruneCommand } from "./prune.ts";
import { pullCommand } from "./pull.ts";
import { pushCommand } from "./push.ts";
import { rmCommand } from "./rm.ts";

/** Each command's factory: it adds the command, with its options and action, to the program. */
export const commands: readonly ((program: Command) => Command)[] = [
  loginCommand,
  logoutCommand,
  fetchCommand,
  pushCommand,
  exportCommand,
  importCommand,
  pullCommand,
  cloneCommand,
  listCommand,
  rmCommand,
  pruneCommand,
  getconfigCommand,
  generateSigstoreKeyCommand,
];
