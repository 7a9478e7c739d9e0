import assert from "node:assert/strict";
import { SardeError } from "../lib/util/errors.ts";
import {
  checkMinSize,
  formatSize,
  parseBoolean,
  parseIntInRange,
  parsePositiveInt,
  parseSize,
} from "../lib/util/units.ts";

Deno.test("parseSize: binary and decimal units, integers out (0.4 returned floats)", () => {
  assert.equal(parseSize("256 MiB"), 268435456);
  assert.equal(parseSize("7M"), 7 * 1024 * 1024);
  assert.equal(parseSize("7MB"), 7_000_000);
  assert.equal(parseSize("1000000"), 1_000_000);
  assert.equal(parseSize("1.5k"), 1536);
  assert.equal(parseSize("4 mebibytes"), 4 << 20);
  assert.ok(Number.isInteger(parseSize("0.3k")));
});

Deno.test("parseSize: rejects garbage with a usage error", () => {
  for (const s of ["", "MiB", "12 parsecs", "-5", "1 2 MiB"]) {
    assert.throws(
      () => parseSize(s, "--chunk-size"),
      (e: unknown) => e instanceof SardeError && e.kind === "usage",
      s,
    );
  }
});

Deno.test("parseBoolean: 0.4 read 'false' as true; we do not", () => {
  assert.equal(parseBoolean("false"), false);
  assert.equal(parseBoolean("No"), false);
  assert.equal(parseBoolean("on"), true);
  assert.throws(() => parseBoolean("maybe"), SardeError);
});

Deno.test("parsePositiveInt", () => {
  assert.equal(parsePositiveInt("4"), 4);
  assert.throws(() => parsePositiveInt("0"), SardeError);
  assert.throws(() => parsePositiveInt("2.5"), SardeError);
});

Deno.test("parseIntInRange: bounds named in the error", () => {
  assert.equal(parseIntInRange("19", "--zstd-level", 1, 19), 19);
  assert.equal(parseIntInRange("0", "verbose", 0), 0);
  assert.throws(
    () => parseIntInRange("99", "[export] zstd-level", 1, 19),
    /invalid \[export\] zstd-level '99' \(expected a whole number from 1 to 19\)/,
  );
  assert.throws(() => parseIntInRange("-1", "x", 0), /expected a whole number ≥ 0/);
});

Deno.test("checkMinSize: a size without its unit is refused with a hint", () => {
  assert.equal(checkMinSize(1 << 20, 1 << 20, "--chunksize"), 1 << 20);
  const refused = (bytes: number, message: RegExp, hint: RegExp) =>
    assert.throws(
      () => checkMinSize(bytes, 1 << 20, "--chunksize", "the minimum for zstd chunks"),
      (e: unknown) =>
        e instanceof SardeError && e.kind === "usage" && message.test(e.message) &&
        hint.test(e.hint ?? ""),
    );
  refused(
    64,
    /^invalid --chunksize 64 bytes: the minimum for zstd chunks is 1MiB$/,
    /^64 means 64 bytes; did you mean 64MiB\?$/,
  );
  refused(0, /--chunksize 0 bytes/, /leave it out for the default/);
  refused(512 << 10, /--chunksize 512KiB/, /leave it out/);
  assert.equal(formatSize(64 << 10), "64KiB");
  assert.equal(formatSize(3 * 2 ** 30), "3GiB");
  assert.equal(formatSize(1000), "1000 bytes");
});
