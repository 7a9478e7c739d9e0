/**
 * The version of sarde and its executor.
 *
 * @module
 */

/** Printed by `--version` and reported as the executor's driver version. */
export const VERSION = "0.2.0";
