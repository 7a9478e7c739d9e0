import assert from "node:assert/strict";
import { SardeError } from "../lib/errors.ts";
import { parseBoolean, parsePositiveInt, parseSize } from "../lib/units.ts";

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
