import assert from "node:assert/strict";
import { parseJsonStrict } from "../lib/util/json.ts";

Deno.test("parseJsonStrict: parses like JSON.parse", () => {
  const text = '{"a": [1, {"b": null}], "c": {"a": "x"}, "d": "\\u0041"}';
  assert.deepEqual(parseJsonStrict(text), JSON.parse(text));
  // The same key in different objects is no duplicate.
  assert.deepEqual(parseJsonStrict('[{"k": 1}, {"k": 2}]'), [{ k: 1 }, { k: 2 }]);
});

Deno.test("parseJsonStrict: refuses a key twice in one object, at any depth", () => {
  assert.throws(() => parseJsonStrict('{"a": 1, "a": 2}'), /^SyntaxError: duplicate key "a"$/);
  assert.throws(() => parseJsonStrict('[{"x": {"k": 1, "k": 1}}]'), /duplicate key "k"/);
  // Escapes spell the same key: JSON.parse sees one.
  assert.throws(() => parseJsonStrict('{"a": 1, "\\u0061": 2}'), /duplicate key "a"/);
});

Deno.test("parseJsonStrict: refuses what JSON.parse refuses (comments, trailing commas)", () => {
  assert.throws(() => parseJsonStrict('{"a": 1,}'), SyntaxError);
  assert.throws(() => parseJsonStrict('{"a": 1 /* c */}'), SyntaxError);
});
