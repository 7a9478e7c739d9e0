/**
 * The local image store (`ocidir`): one OCI image layout per repository at `<ocidir>/<name>/`,
 * where `<name>` is the reference as written (`registry.example.org/sardines/debian`), exactly as
 * sardinecake 0.4 lays it out.
 *
 * @module
 */

import { join, relative, resolve, sep } from "node:path";
import { fail } from "../util/errors.ts";
import { checkDir } from "../util/fsutil.ts";
import {
  isLayout,
  type Layout,
  openLayout,
  readBlob,
  readIndex,
  selectManifest,
} from "./layout.ts";
import { warn } from "../util/log.ts";
import { type Descriptor, isIndexMediaType, type Manifest, parseManifest } from "./types.ts";
import { formatLocalName, type Reference } from "./reference.ts";

/**
 * A default data folder of sarde: `$envVar` if set, `/var/lib/sardinecake/<leaf>` for root,
 * else `$XDG_DATA_HOME/sardinecake/<leaf>` (`~/.local/share/…`).
 */
export function defaultDataDir(envVar: string, leaf: string): string {
  const fromEnv = Deno.env.get(envVar);
  if (fromEnv) return fromEnv;
  if (Deno.uid() === 0) return join("/var/lib/sardinecake", leaf);
  const home = Deno.env.get("HOME") ?? ".";
  return join(Deno.env.get("XDG_DATA_HOME") ?? join(home, ".local", "share"), "sardinecake", leaf);
}

/** The default store: `$SARDE_OCIDIR`, `/var/lib/sardinecake/OCI` for root, else under `$XDG_DATA_HOME`. */
export function defaultOcidir(): string {
  return defaultDataDir("SARDE_OCIDIR", "OCI");
}

/** The layout folder for a reference's local name; refuses names that would leave the store. */
export function layoutDir(ocidir: string, ref: Reference): string {
  const root = resolve(ocidir);
  const dir = resolve(root, ref.name);
  if (dir === root || !dir.startsWith(root + sep)) {
    throw fail("usage", `image name '${ref.name}' does not fit in the local store`);
  }
  return dir;
}

/**
 * Finds every layout below `ocidir` (the root itself counts, named `.`), sorted by name. A store
 * that does not exist yet is empty; one that is no folder, or unreadable, is an error.
 */
export async function findLayouts(ocidir: string): Promise<{ name: string; dir: string }[]> {
  const root = resolve(ocidir);
  const found: { name: string; dir: string }[] = [];
  if (!await checkDir(root, "the local store", "choose another one with --ocidir")) return found;
  const walk = async (dir: string, depth: number) => {
    let entries: Deno.DirEntry[] = [];
    try {
      if (await isLayout(dir)) found.push({ name: relative(root, dir) || ".", dir });
      if (depth > 16) return;
      for await (const e of Deno.readDir(dir)) entries.push(e);
    } catch (err) {
      // Another user's folder in a shared store: the rest of the store is still worth listing.
      if (err instanceof Deno.errors.PermissionDenied) {
        warn(`skipping ${dir}: permission denied`);
      }
      return;
    }
    entries = entries.filter((e) => e.isDirectory && e.name !== "blobs" && !e.name.startsWith("."));
    for (const e of entries) await walk(join(dir, e.name), depth + 1);
  };
  await walk(root, 0);
  return found.sort((a, b) => a.name.localeCompare(b.name));
}

/** Reads the manifest a local reference points at. */
export async function readLocalManifest(
  ocidir: string,
  local: Reference,
): Promise<{ layout: Layout; descriptor: Descriptor; bytes: Uint8Array; manifest: Manifest }> {
  const what = formatLocalName(local);
  const layout = await openLayout(layoutDir(ocidir, local), { what });
  const descriptor = selectManifest(await readIndex(layout), local, what);
  if (isIndexMediaType(descriptor.mediaType)) {
    throw fail("usage", `${what} is an image index; sarde works with single manifests`);
  }
  const bytes = await readBlob(layout, descriptor.digest);
  return { layout, descriptor, bytes, manifest: parseManifest(bytes, `manifest of ${what}`) };
}
