/**
 * `deno run --allow-read tools/check_imports.ts`: fails when a module under `lib/` imports from a
 * folder above its own. The folders are layers, lowest first; a layer may import from itself and
 * the layers below it, never from above and never from the programs (`mod.ts`, `cli.ts`,
 * `executor.ts`). This keeps the tree readable from the bottom up: a byte goes from `vm/export`
 * through `image/` and `oci/` to `transfer/` and `registry/`.
 *
 * @module
 */

import { dirname, join, relative, resolve } from "node:path";

/** The layers of `lib/`, lowest first. */
export const LAYERS = [
  "util",
  "oci",
  "registry",
  "image",
  "transfer",
  "trust",
  "lazy",
  "vm",
  "executor",
] as const;

const root = resolve(dirname(new URL(import.meta.url).pathname), "..");
const lib = join(root, "lib");

/** The layer index of a path under `lib/`, or `undefined` outside it. */
function layerOf(path: string): number | undefined {
  const rel = relative(lib, path);
  if (rel.startsWith("..")) return undefined;
  const i = LAYERS.indexOf(rel.split("/")[0] as typeof LAYERS[number]);
  return i < 0 ? Infinity : i;
}

async function* tsFiles(dir: string): AsyncGenerator<string> {
  for await (const e of Deno.readDir(dir)) {
    const p = join(dir, e.name);
    if (e.isDirectory) yield* tsFiles(p);
    else if (e.name.endsWith(".ts")) yield p;
  }
}

const problems: string[] = [];
for await (const file of tsFiles(lib)) {
  const own = layerOf(file)!;
  if (own === Infinity) problems.push(`${relative(root, file)}: not in a layer folder (${LAYERS})`);
  const text = await Deno.readTextFile(file);
  for (const m of text.matchAll(/(?:from|import)\s*\(?\s*["'](\.\.?\/[^"']+)["']/g)) {
    const target = resolve(dirname(file), m[1]);
    const layer = layerOf(target);
    if (layer === undefined) {
      problems.push(`${relative(root, file)}: imports ${m[1]}, outside lib/`);
    } else if (layer > own) {
      problems.push(
        `${relative(root, file)}: imports ${m[1]} (${LAYERS[layer]} is above ${LAYERS[own]})`,
      );
    }
  }
}
if (problems.length) {
  console.error(problems.join("\n"));
  console.error(
    `check_imports: ${problems.length} upward import(s); layers, lowest first: ${
      LAYERS.join(" → ")
    }`,
  );
  Deno.exit(1);
}
console.error(`check_imports: lib/ imports only downward (${LAYERS.join(" → ")})`);
