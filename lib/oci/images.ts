/**
 * Queries on the local store: listing images and reading an image's sardine VM config.
 *
 * @module
 */

import { fail, SardeError } from "../util/errors.ts";
import { descriptorTag, openLayout, readBlob, readIndex, useLayout } from "./layout.ts";
import { warn } from "../util/log.ts";
import { isIndexMediaType, type Manifest, MediaType, parseManifest } from "./types.ts";
import { formatLocalName, type Reference } from "./reference.ts";
import { findLayouts, layoutDir, readLocalManifest } from "./store.ts";

/** Whether the VM imported from an image is running, defined but stopped, or not defined. */
export type VmState = "running" | "stopped" | "missing";

/** One manifest entry of the local store. */
export interface ImageEntry {
  /** Where the image is: the local OCI store (the SOURCE column of `sarde list`). */
  source: "oci";
  /** Repository name as stored (`registry.example.org/sardines/debian`). */
  name: string;
  /** Tag, or null for an untagged entry. */
  tag: string | null;
  /** Manifest digest. */
  digest: string;
  /** Config digest: the image ID and the default VM name on import. */
  id: string;
  /** The state of the VMs imported from the image. */
  state: VmState;
}

/** Looks up the state of the VM named after an image ID. */
export type StateLookup = (imageId: string) => Promise<VmState>;

/**
 * Lists every manifest in the store. Broken layouts or missing manifests are reported as warnings
 * and skipped, never fatal.
 */
export async function listImages(ocidir: string, stateOf?: StateLookup): Promise<ImageEntry[]> {
  const entries: ImageEntry[] = [];
  for (const { name, dir } of await findLayouts(ocidir)) {
    // Read while no `sarde rm` or `prune` is removing it (it is then gone, not broken).
    using _use = await useLayout({ dir }).catch((err) => {
      if (err instanceof SardeError && err.kind === "not-found") return undefined;
      throw err;
    });
    if (!_use) continue;
    let index;
    try {
      index = await readIndex({ dir });
    } catch (err) {
      warn(`skipping ${dir}: ${(err as Error).message}`);
      continue;
    }
    for (const d of index.manifests) {
      if (isIndexMediaType(d.mediaType)) continue;
      let id: string;
      try {
        id = parseManifest(await readBlob({ dir }, d.digest), d.digest).config.digest;
      } catch (err) {
        warn(`skipping ${name}@${d.digest}: ${(err as Error).message}`);
        continue;
      }
      entries.push({
        source: "oci",
        name,
        tag: descriptorTag(d) ?? null,
        digest: d.digest,
        id,
        state: "missing",
      });
    }
  }
  if (stateOf) {
    const states = new Map<string, VmState>();
    for (const e of entries) {
      if (!states.has(e.id)) states.set(e.id, await stateOf(e.id));
      e.state = states.get(e.id)!;
    }
  }
  return entries;
}

/** Renders {@link listImages} output as the text table of `sarde list`. */
export function formatImageTable(entries: ImageEntry[]): string {
  const sorted = [...entries].sort((a, b) =>
    a.id.localeCompare(b.id) || a.name.localeCompare(b.name) ||
    (a.tag ?? "").localeCompare(b.tag ?? "")
  );
  const rows: string[][] = [["SOURCE", "NAME", "IMAGE ID", "STATE"]];
  const seenIds = new Set<string>();
  for (const e of sorted) {
    if (!seenIds.has(e.id)) {
      seenIds.add(e.id);
      rows.push([e.source, `${e.name}@${e.digest}`, e.id, e.state]);
    }
    if (e.tag) rows.push([e.source, `${e.name}:${e.tag}`, e.id, '"']);
  }
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  return rows.map((r) =>
    r.map((cell, c) => c === r.length - 1 ? cell : cell.padEnd(widths[c])).join("  ")
  )
    .join("\n") + "\n";
}

/**
 * Returns the sardine VM config (`users`, `services`) of a local image, or `undefined` when the
 * image has none. A missing image is an error.
 */
export async function getVmConfig(
  ocidir: string,
  ref: Reference,
  manifest?: Manifest,
): Promise<Record<string, unknown> | undefined> {
  using _use = await useLayout({ dir: layoutDir(ocidir, ref) }, formatLocalName(ref));
  const local = manifest
    ? { layout: await openLayout(layoutDir(ocidir, ref), { what: formatLocalName(ref) }), manifest }
    : await readLocalManifest(ocidir, ref);
  const { layout } = local;
  manifest = local.manifest;
  if (manifest.config.mediaType !== MediaType.ociConfig) {
    throw fail(
      "usage",
      `${ref.name} is not a sardinecake image (config type ${manifest.config.mediaType})`,
    );
  }
  const layer = manifest.layers.find((l) =>
    l.mediaType.split(";")[0].trim() === MediaType.sardineConfig
  );
  if (!layer) return undefined;
  const bytes = await readBlob(layout, layer.digest, 1 << 20);
  try {
    const value = JSON.parse(new TextDecoder().decode(bytes));
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      throw new Error("not an object");
    }
    return value;
  } catch (err) {
    throw fail(
      "integrity",
      `the VM config of ${ref.name} is not a JSON object (${(err as Error).message})`,
    );
  }
}
