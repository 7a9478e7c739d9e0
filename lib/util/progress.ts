/**
 * Progress bars for long transfers, drawn on stderr only when it is a terminal (CI logs stay
 * clean), and silent with `-q`.
 *
 * @module
 */

import cliProgress from "cli-progress";
import process from "node:process";
import { LogLevel, logLevel } from "./log.ts";

/** A byte counter that may draw a bar. */
export interface Progress {
  /** Adds (or, after a restart, subtracts) bytes. */
  add(bytes: number): void;
  /** Stops drawing. */
  stop(): void;
}

/** Formats a byte count for humans (binary units). */
export function formatBytes(n: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let u = 0;
  while (Math.abs(v) >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${u === 0 ? v : v.toFixed(1)} ${units[u]}`;
}

/** Starts a progress bar for `total` bytes labelled `label`; a no-op when not on a TTY. */
export function startProgress(label: string, total: number): Progress {
  if (!Deno.stderr.isTerminal() || logLevel() > LogLevel.info || total <= 0) {
    return { add() {}, stop() {} };
  }
  const bar = new cliProgress.SingleBar({
    format: `${label} [{bar}] {percentage}% | {done} / {size} | {speed}`,
    stream: process.stderr,
    hideCursor: true,
    clearOnComplete: false,
    fps: 5,
  }, cliProgress.Presets.shades_classic);
  const started = performance.now();
  let value = 0;
  const payload = () => ({
    done: formatBytes(value),
    size: formatBytes(total),
    speed: `${formatBytes(value / Math.max(0.001, (performance.now() - started) / 1000))}/s`,
  });
  bar.start(total, 0, payload());
  return {
    add(bytes) {
      value += bytes;
      bar.update(Math.max(0, value), payload());
    },
    stop() {
      bar.stop();
    },
  };
}
