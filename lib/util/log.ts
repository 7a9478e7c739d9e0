/**
 * Logging to stderr. stdout is reserved for results (a VM name, JSON), so every diagnostic goes
 * through here.
 *
 * @module
 */

/** Verbosity levels; a message is shown when its level is at or above the current one. */
export const LogLevel = { debug: 10, info: 20, warn: 30, error: 40, silent: 100 } as const;
/** One of {@link LogLevel}'s values. */
export type LogLevelValue = (typeof LogLevel)[keyof typeof LogLevel];

let current: number = LogLevel.info;
const encoder = new TextEncoder();

/** Sets the verbosity from `-v`/`-q` counts as sardinecake does: info by default. */
export function setVerbosity(verbose: number, quiet: number): void {
  current = Math.max(LogLevel.debug, LogLevel.info - 10 * (verbose - quiet));
}

/** The current threshold. */
export function logLevel(): number {
  return current;
}

function emit(level: number, tag: string, message: string): void {
  if (level < current) return;
  Deno.stderr.writeSync(encoder.encode(`${tag}${message}\n`));
}

/** Detailed diagnostics (shown with `-v`). */
export function debug(message: string): void {
  emit(LogLevel.debug, "debug: ", message);
}
/** Normal progress messages. */
export function info(message: string): void {
  emit(LogLevel.info, "", message);
}
/** Something went wrong but the command goes on. */
export function warn(message: string): void {
  emit(LogLevel.warn, "warning: ", message);
}
/** The command failed. */
export function error(message: string): void {
  emit(LogLevel.error, "error: ", message);
}
