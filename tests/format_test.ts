/** lib/image/format.ts: how the config's diff_ids must describe the layers (checkDiffIds). */
import assert from "node:assert/strict";
import { SardeError } from "../lib/util/errors.ts";
import { checkDiffIds, checkZstdFiles, groupDiskLayers } from "../lib/image/format.ts";
import { type Descriptor, type Manifest, MediaType } from "../lib/oci/types.ts";

const d = (n: number) => `sha256:${n.toString(16).padStart(64, "0")}`;
const layer = (mediaType: string, n: number, annotations?: Record<string, string>) =>
  ({ mediaType, digest: d(n), size: 1, ...(annotations ? { annotations } : {}) }) as Descriptor;
const manifest = (layers: Descriptor[]): Manifest => ({
  schemaVersion: 2,
  mediaType: MediaType.ociManifest,
  config: { mediaType: MediaType.ociConfig, digest: d(999), size: 1 },
  layers,
});
const refused = (e: unknown) =>
  e instanceof SardeError && e.kind === "integrity" && /image config/.test(e.message);

const xml = layer(MediaType.libvirtDomain, 1);
const vmconfig = layer(MediaType.sardineConfig, 2);

Deno.test("checkDiffIds: sardinecake 0.4's gzip layout — one diff_id per file", () => {
  const m = manifest([
    xml,
    vmconfig,
    layer("application/x-qemu-disk+gzip", 10),
    layer("application/x-qemu-disk+gzip;chunk=1", 11),
    layer("application/x-qemu-disk+gzip", 12),
  ]);
  assert.deepEqual(checkDiffIds(m, [d(1), d(2), d(100), d(101)], "img"), [d(100), d(101)]);
  assert.throws(() => checkDiffIds(m, [d(1), d(2), d(100)], "img"), refused);
  assert.throws(() => checkDiffIds(m, [d(1), d(2), d(100), d(101), d(102)], "img"), refused);
  assert.throws(() => checkDiffIds(m, [d(7), d(2), d(100), d(101)], "img"), refused);
});

/** A zstd chunk layer of file `name` (1 MiB chunks of a 2 MiB file). */
const chunk = (n: number, digest: string, index = n % 2, name = "disk.qcow2") =>
  layer("application/x-qemu-disk+zstd", n, {
    "org.sardinecake.file.name": name,
    "org.sardinecake.file.size": String(2 << 20),
    "org.sardinecake.file.digest": d(500),
    "org.sardinecake.chunk.index": String(index),
    "org.sardinecake.chunk.offset": String(index << 20),
    "org.sardinecake.chunk.size": String(1 << 20),
    "org.sardinecake.chunk.digest": digest,
  });

Deno.test("checkDiffIds: zstd — one diff_id per chunk, its uncompressed digest", () => {
  const m = manifest([xml, chunk(20, d(200)), chunk(21, d(201))]);
  assert.deepEqual(checkDiffIds(m, [d(1), d(200), d(201)], "img"), []);
  // The blob digest is not the diff_id; swapped chunks are not either.
  assert.throws(() => checkDiffIds(m, [d(1), d(20), d(21)], "img"), refused);
  assert.throws(() => checkDiffIds(m, [d(1), d(201), d(200)], "img"), refused);
  // Per-file diff_ids (sarde 0.2.0) do not describe the chunks.
  assert.throws(() => checkDiffIds(m, [d(1), d(300)], "img"), refused);
  for (const bad of [undefined, "x", [1, 2], {}]) {
    assert.throws(() => checkDiffIds(m, bad, "img"), (e: unknown) => e instanceof SardeError);
  }
});

Deno.test("checkDiffIds: zstd chunks must come in their file's order (the diff_ids' order)", () => {
  // Index/offset annotations swapped: each chunk still matches its diff_id, but the file would
  // be assembled in another order than the config describes.
  const m = manifest([xml, chunk(20, d(200), 1), chunk(21, d(201), 0)]);
  assert.throws(() => checkDiffIds(m, [d(1), d(200), d(201)], "img"), refused);
});

Deno.test("checkZstdFiles: the config's file list must be the manifest's files", () => {
  const m = manifest([xml, chunk(20, d(200), 0), chunk(21, d(201), 1)]);
  const files = groupDiskLayers(m, "img");
  const entry = { name: "disk.qcow2", size: 2 << 20, digest: d(500), chunks: 2 };
  checkZstdFiles(files, JSON.stringify([entry]), "img");
  const wrong = (e: unknown) =>
    e instanceof SardeError && e.kind === "integrity" && /config lists/.test(e.message);
  for (
    const label of [
      undefined, // an older sarde's image
      "not json",
      JSON.stringify([{ ...entry, name: "other.qcow2" }]),
      JSON.stringify([{ ...entry, size: 1 }]),
      JSON.stringify([{ ...entry, backing: "base.qcow2", backingFormat: "qcow2" }]),
      JSON.stringify([entry, entry]),
    ]
  ) {
    assert.throws(() => checkZstdFiles(files, label, "img"), wrong, String(label));
  }
  // gzip-only images (sardinecake 0.4) have no such list and need none.
  checkZstdFiles([], undefined, "img");
});
