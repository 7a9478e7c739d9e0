/**
 * `sarde`: share libvirt VMs through OCI registries. A thin shell over `mod.ts`: parse options
 * (command line over INI files over built-in defaults), call the library, print results on stdout
 * and everything else on stderr.
 *
 * @module
 */

import { Command, CommanderError } from "commander";
import { installSignalHandlers, settleInterrupt } from "./lib/util/cleanup.ts";
import { sardeConfig } from "./lib/util/config.ts";
import { SardeError } from "./lib/util/errors.ts";
import { error, setVerbosity } from "./lib/util/log.ts";
import { VERSION } from "./lib/util/version.ts";
import { commands } from "./cli/commands/mod.ts";
import { lazyServeCommand } from "./cli/commands/lazy_serve.ts";
import { applyConfig, commandKeys, counterOption } from "./cli/options.ts";

export { commandKeys, VERSION };

/** Builds the command tree: the program and its options, then each command from `cli/commands/`. */
export function buildProgram(): Command {
  const program = new Command()
    .name("sarde")
    .description(
      "Share libvirt/QEMU virtual machines through OCI registries.\n\n" +
        "Results (names, digests, JSON) go to stdout; logs and progress go to stderr.\n" +
        "Defaults come from /etc/sardinecake/sarde.ini and ~/.config/sardinecake/sarde.ini\n" +
        "(or the files in $SARDE_CONF_FILES): [DEFAULT] and a section per command.",
    )
    .version(VERSION, "-V, --version")
    .addOption(counterOption("-v, --verbose", "more output (repeatable)"))
    .addOption(counterOption("-q, --quiet", "less output (repeatable)"))
    .showHelpAfterError("(run with --help for usage)")
    .exitOverride()
    .configureOutput({ writeErr: (s) => Deno.stderr.writeSync(new TextEncoder().encode(s)) })
    .hook("preAction", (cmd) => {
      const o = cmd.opts() as { verbose: number; quiet: number };
      setVerbosity(o.verbose, o.quiet);
    });

  for (const add of commands) add(program);
  lazyServeCommand(program);
  return program;
}

/** The sub-command named in `args` (the first word that is not an option), if there is one. */
function commandOf(program: Command, args: string[]): Command | undefined {
  const word = args.find((a) => !a.startsWith("-"));
  return program.commands.find((c) => c.name() === word || c.aliases().includes(word!));
}

/** Runs the CLI with `args`; returns the exit code instead of exiting (for tests). */
export async function main(args: string[]): Promise<number> {
  try {
    const program = buildProgram();
    const cmd = commandOf(program, args);
    if (cmd) {
      // An alias reads its command's section: `sarde ls` is configured by [list].
      const config = await sardeConfig(cmd.name(), commandKeys(program));
      applyConfig(program, config);
      applyConfig(cmd, config);
    }
    await program.parseAsync(args, { from: "user" });
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) return err.exitCode === 0 ? 0 : 2;
    if (err instanceof SardeError) {
      error(err.message);
      if (err.hint) Deno.stderr.writeSync(new TextEncoder().encode(`hint: ${err.hint}\n`));
      return err.exitCode;
    }
    error(`unexpected failure: ${err instanceof Error ? err.stack ?? err.message : String(err)}`);
    error("this is a bug in sarde; please report it with the command you ran");
    return 70;
  }
}

if (import.meta.main) {
  installSignalHandlers();
  const code = await main(Deno.args);
  await settleInterrupt();
  Deno.exit(code);
}
