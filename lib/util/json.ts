/**
 * JSON as strictly as containers/image reads security-relevant files (its
 * `paranoidUnmarshalJSONObject`): a key twice in one object is refused, since `JSON.parse` keeps
 * the last and another reader may keep the first — two programs would then disagree on what a
 * policy or signed payload says.
 *
 * @module
 */

import { visit } from "jsonc-parser";

/**
 * Parses `text` as JSON, refusing duplicate keys in any object. Throws a `SyntaxError` whose
 * message is one line (callers prefix the file or what was parsed).
 */
export function parseJsonStrict(text: string): unknown {
  const value = JSON.parse(text);
  const open: Set<string>[] = [];
  let duplicate: string | undefined;
  visit(text, {
    onObjectBegin: () => void open.push(new Set()),
    onObjectEnd: () => void open.pop(),
    onObjectProperty: (key) => {
      const keys = open[open.length - 1];
      if (keys.has(key)) duplicate ??= key;
      keys.add(key);
    },
  });
  if (duplicate !== undefined) throw new SyntaxError(`duplicate key "${duplicate}"`);
  return value;
}
