/**
 * The kinds of option of `sarde`, and their INI values: each option keeps its own parser, so that
 * a value from an INI file gets exactly the checks of the command line, and an error names the file
 * and line it came from.
 *
 * @module
 */

import { type Command, Option } from "commander";
import { atOrigin, type CommandKeys, expandHome, getString } from "../lib/util/config.ts";
import { SardeError } from "../lib/util/errors.ts";
import { parseBoolean, parseIntInRange } from "../lib/util/units.ts";

/** Values from the INI files for the command being run (`[DEFAULT]` + its own section). */
export type Config = Record<string, string>;

/** Parses an option's value; `what` names it in errors (`--concurrency`, `[pull] concurrency`). */
export type Parse = (text: string, what: string) => unknown;

// Each option's parser, so that its INI value gets exactly the checks of the command line.
const parsers = new WeakMap<Option, Parse>();
// The INI values each command was given, to say where a value that fails a later check came from.
const configs = new WeakMap<Command, Config>();

/** An option with a value that `parse` checks, on the command line and in INI files alike. */
export function valueOption(flags: string, description: string, parse: Parse): Option {
  const option = new Option(flags, description);
  parsers.set(option, parse);
  return option.argParser((text: string) => parse(text, `--${option.name()}`));
}

/** A path: `~` is expanded (the shell leaves `--opt=~/x` alone; INI files need it anyway). */
export const pathOption = (flags: string, description: string): Option =>
  valueOption(flags, description, (text) => expandHome(text));

/** An option with a fixed set of values. */
export const choiceOption = (
  flags: string,
  description: string,
  choices: readonly string[],
): Option =>
  valueOption(flags, description, (text, what) => {
    if (choices.includes(text)) return text;
    throw new SardeError("usage", `invalid ${what} '${text}' (${choices.join(" or ")})`);
  });

/** A repeatable flag (`-vv`); an INI file gives the count. */
export function counterOption(flags: string, description: string): Option {
  const option = new Option(flags, description).argParser((_: string, n: number) => n + 1)
    .default(0);
  parsers.set(option, (text, what) => parseIntInRange(text, what, 0));
  return option;
}

/** The options that an INI file can set: all but `--version`. */
const iniOptions = (cmd: Command) => cmd.options.filter((o) => o.attributeName() !== "version");

/**
 * The INI keys of each command: its long option names and the program's (`verbose`, `quiet`),
 * taken from the option definitions so that the two can never drift apart.
 */
export function commandKeys(program: Command): CommandKeys[] {
  const names = (cmd: Command) => iniOptions(cmd).map((o) => o.name());
  return program.commands.map((cmd) => ({
    name: cmd.name(),
    aliases: cmd.aliases(),
    keys: [...names(program), ...names(cmd)],
  }));
}

/**
 * Gives the options of `cmd` their INI values (the command line still wins), each through the
 * option's own parser: a value the command line would refuse is refused, with its file and line.
 */
export function applyConfig(cmd: Command, config: Config): void {
  configs.set(cmd, config);
  for (const option of iniOptions(cmd)) {
    const text = getString(config, option.name())?.trim();
    if (!text) continue; // an empty value means "not set"
    const parse = parsers.get(option) ?? (option.isBoolean() ? parseBoolean : (t: string) => t);
    const value = atOrigin(config, option.name(), (what) => parse(text, what));
    cmd.setOptionValueWithSource(option.attributeName(), value, "config");
  }
}

/** Runs a check of an option's value that needs other options, naming the value as it was given. */
export function checkOption<T>(cmd: Command, key: string, check: (what: string) => T): T {
  const option = cmd.options.find((o) => o.name() === key)!;
  return cmd.getOptionValueSource(option.attributeName()) === "config"
    ? atOrigin(configs.get(cmd)!, key, check)
    : check(`--${key}`);
}
