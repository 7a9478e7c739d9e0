/**
 * Building blocks with no knowledge of images, registries or VMs: errors and exit codes, stderr
 * logging and progress, Ctrl-C cleanup, retries with backoff, a concurrency pool, sizes and
 * durations, crash-safe files and locks, external programs (qemu-img's allocation map among them),
 * O_DIRECT I/O, freeing buffers now, strict JSON, the INI dialect of both programs, the version.
 *
 * @module
 */

export * from "./cleanup.ts";
export * from "./command.ts";
export * from "./config.ts";
export * from "./direct_io.ts";
export * from "./errors.ts";
export * from "./fsutil.ts";
export * from "./gate.ts";
export * from "./json.ts";
export * from "./log.ts";
export * from "./memory.ts";
export * from "./net.ts";
export * from "./pool.ts";
export * from "./qemu_img.ts";
export * from "./progress.ts";
export * from "./retry.ts";
export * from "./terminal.ts";
export * from "./units.ts";
export * from "./version.ts";
