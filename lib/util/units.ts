/**
 * Human sizes (`256 MiB`, `7M`, `1.5GB`) and booleans as written in options and INI files.
 *
 * @module
 */

import { fail } from "./errors.ts";

const binary = ["", "k", "m", "g", "t", "p", "e"];
const binaryLong = ["byte", "kibibyte", "mebibyte", "gibibyte", "tebibyte", "pebibyte", "exbibyte"];
const decimalLong = ["byte", "kilobyte", "megabyte", "gigabyte", "terabyte", "petabyte", "exabyte"];

function unitFactor(unit: string): number | undefined {
  const u = unit.toLowerCase().replace(/s$/, "");
  if (u === "" || u === "b" || u === "byte") return 1;
  for (let i = 1; i < binary.length; i++) {
    if ([binary[i], `${binary[i]}ib`, binaryLong[i]].includes(u)) return 1024 ** i;
    if ([`${binary[i]}b`, decimalLong[i]].includes(u)) return 1000 ** i;
  }
  return undefined;
}

/**
 * Parses a size: a number and an optional unit (`k m g t` and `KiB…` are binary, `kB MB…` decimal,
 * case-insensitive), rounded to whole bytes. Throws a `usage` error naming `what` otherwise.
 */
export function parseSize(text: string | number, what = "size"): number {
  if (typeof text === "number") {
    if (Number.isFinite(text) && text >= 0) return Math.round(text);
    throw fail("usage", `invalid ${what} '${text}'`);
  }
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const factor = m ? unitFactor(m[2]) : undefined;
  if (!m || factor === undefined) {
    throw fail(
      "usage",
      `invalid ${what} '${text}'`,
      "use a number with an optional unit, e.g. 256MiB, 4M, 1GB",
    );
  }
  const value = Math.round(Number(m[1]) * factor);
  if (!Number.isSafeInteger(value)) throw fail("usage", `${what} '${text}' is too large`);
  return value;
}

/** Parses a boolean as INI files and flags write it (`true/false/yes/no/on/off/1/0`). */
export function parseBoolean(text: string | boolean, what = "value"): boolean {
  if (typeof text === "boolean") return text;
  const t = text.trim().toLowerCase();
  if (["1", "true", "yes", "on"].includes(t)) return true;
  if (["0", "false", "no", "off"].includes(t)) return false;
  throw fail("usage", `invalid ${what} '${text}' (expected true or false)`);
}

/** Parses a whole number from `min` to `max` (an option's or an INI key's value, named by `what`). */
export function parseIntInRange(
  text: string,
  what: string,
  min: number,
  max = Number.MAX_SAFE_INTEGER,
): number {
  const n = Number(text);
  if (!/^\s*\d+\s*$/.test(text) || !Number.isSafeInteger(n) || n < min || n > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `≥ ${min}` : `from ${min} to ${max}`;
    throw fail("usage", `invalid ${what} '${text}' (expected a whole number ${range})`);
  }
  return n;
}

/** Parses a positive integer option. */
export function parsePositiveInt(text: string, what = "number"): number {
  return parseIntInRange(text, what, 1);
}

/** `n` bytes in the largest binary unit that divides it (`64KiB`, `1MiB`), else in bytes. */
export function formatSize(n: number): string {
  for (let i = binary.length - 1; i > 0; i--) {
    if (n !== 0 && n % 1024 ** i === 0) return `${n / 1024 ** i}${binary[i].toUpperCase()}iB`;
  }
  return `${n} bytes`;
}

/**
 * Refuses a size below `min` (`of` says what has that minimum). Such a size is almost always a missing unit (`--chunksize 64` is 64
 * bytes, not 64 MiB), and would cut gigabytes into millions of pieces instead of failing.
 */
export function checkMinSize(bytes: number, min: number, what: string, of = "the minimum"): number {
  if (bytes >= min) return bytes;
  throw fail(
    "usage",
    `invalid ${what} ${formatSize(bytes)}: ${of} is ${formatSize(min)}`,
    bytes > 0 && bytes < 1024
      ? `${bytes} means ${bytes} bytes; did you mean ${bytes}MiB?`
      : "leave it out for the default",
  );
}
