/**
 * The version of sarde and its executor.
 *
 * @module
 */

/**
 * Printed by `--version`, reported as the executor's driver version and in the User-Agent.
 * 0.3.0: zstd images list their files in the config and have one diff_id per chunk (images
 * exported by 0.2.0 are refused at import: re-export them).
 */
export const VERSION = "0.3.0";
