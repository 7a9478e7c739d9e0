/** lib/format.ts: how the config's diff_ids must describe the layers (checkDiffIds). */
import assert from "node:assert/strict";
import { SardeError } from "../lib/errors.ts";
import { checkDiffIds } from "../lib/format.ts";
import { type Descriptor, type Manifest, MediaType } from "../lib/oci.ts";

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

Deno.test("checkDiffIds: zstd — one diff_id per chunk, its uncompressed digest", () => {
  const chunk = (n: number, digest: string) =>
    layer("application/x-qemu-disk+zstd", n, { "org.sardinecake.chunk.digest": digest });
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
