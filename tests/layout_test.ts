import assert from "node:assert/strict";
import { join } from "node:path";
import { digestOf } from "../lib/digest.ts";
import { SardeError } from "../lib/errors.ts";
import {
  addToIndex,
  blobPath,
  createBlobWriter,
  hasBlob,
  openLayout,
  readBlob,
  readIndex,
  selectManifest,
  writeBlob,
  writeIndex,
} from "../lib/layout.ts";
import { type Descriptor, type ImageIndex, MediaType, REF_NAME_ANNOTATION } from "../lib/oci.ts";

async function tempLayout() {
  const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "sarde-layout-test-" });
  return { layout: await openLayout(join(dir, "repo"), { create: true }), dir };
}

const desc = (n: number): Descriptor => ({
  mediaType: MediaType.ociManifest,
  digest: digestOf(String(n)),
  size: 1,
});

Deno.test("openLayout creates an OCI layout skopeo can read", async () => {
  const { layout, dir } = await tempLayout();
  assert.deepEqual(JSON.parse(await Deno.readTextFile(join(layout.dir, "oci-layout"))), {
    imageLayoutVersion: "1.0.0",
  });
  assert.deepEqual(await readIndex(layout), { schemaVersion: 2, manifests: [] });
  await assert.rejects(
    openLayout(join(dir, "nope")),
    (e: unknown) => e instanceof SardeError && e.kind === "not-found",
  );
  await Deno.remove(dir, { recursive: true });
});

Deno.test("addToIndex moves a tag instead of duplicating it (0.4 appended)", () => {
  let index: ImageIndex = { schemaVersion: 2, manifests: [] };
  index = addToIndex(index, desc(1), "latest");
  index = addToIndex(index, desc(2), "latest");
  index = addToIndex(index, desc(2), "stable");
  index = addToIndex(index, desc(3));
  index = addToIndex(index, desc(3));
  const tags = index.manifests.map((d) => d.annotations?.[REF_NAME_ANNOTATION]);
  assert.deepEqual(tags, ["latest", "stable", undefined]);
  assert.equal(selectManifest(index, { tag: "latest" }, "x").digest, desc(2).digest);
  assert.equal(selectManifest(index, {}, "x").digest, desc(2).digest, "no tag: 'latest' wins");
  assert.equal(selectManifest(index, { digest: desc(3).digest }, "x").digest, desc(3).digest);
  assert.throws(
    () => selectManifest(index, { tag: "nope" }, "x"),
    (e: unknown) =>
      e instanceof SardeError && e.kind === "not-found" && e.hint === "known tags: latest, stable",
  );
});

Deno.test("selectManifest reads 0.4 indexes with duplicate tags: the last one wins", () => {
  const tagged = (n: number) => ({ ...desc(n), annotations: { [REF_NAME_ANNOTATION]: "latest" } });
  const index = { schemaVersion: 2 as const, manifests: [tagged(1), tagged(2)] };
  assert.equal(selectManifest(index, { tag: "latest" }, "x").digest, desc(2).digest);
});

Deno.test("blob writer verifies digest and size, leaves nothing on mismatch", async () => {
  const { layout, dir } = await tempLayout();
  const data = new TextEncoder().encode("hello blob");
  const good = { mediaType: "application/octet-stream", digest: digestOf(data), size: data.length };

  const w1 = await createBlobWriter(layout, good);
  await w1.write(data.subarray(0, 3));
  await w1.reset(); // a server that ignored Range makes us start over
  await w1.write(data);
  await w1.commit();
  assert.ok(await hasBlob(layout, good));
  assert.deepEqual(await readBlob(layout, good.digest), data);

  const wrong = { ...good, digest: digestOf("something else") };
  const w2 = await createBlobWriter(layout, wrong);
  await w2.write(data);
  await assert.rejects(
    w2.commit(),
    (e: unknown) => e instanceof SardeError && e.kind === "integrity",
  );
  assert.ok(!await hasBlob(layout, wrong));
  const leftovers = [...Deno.readDirSync(join(layout.dir, "blobs", "sha256"))].map((e) => e.name);
  assert.deepEqual(leftovers, [good.digest.slice(7)], "no temp files remain");
  await Deno.remove(dir, { recursive: true });
});

Deno.test("readBlob detects a corrupted blob file", async () => {
  const { layout, dir } = await tempLayout();
  const d = await writeBlob(layout, new TextEncoder().encode("{}"), MediaType.ociConfig);
  await Deno.writeTextFile(blobPath(layout, d.digest), "{ }");
  await assert.rejects(readBlob(layout, d.digest), /corrupt/);
  await Deno.remove(dir, { recursive: true });
});

Deno.test("index writes are atomic and parse back", async () => {
  const { layout, dir } = await tempLayout();
  await writeIndex(layout, addToIndex(await readIndex(layout), desc(7), "v1"));
  const index = await readIndex(layout);
  assert.equal(index.manifests.length, 1);
  const names = [...Deno.readDirSync(layout.dir)].map((e) => e.name).filter((n) =>
    n.includes(".tmp-")
  );
  assert.deepEqual(names, []);
  await Deno.writeTextFile(join(layout.dir, "index.json"), "{broken");
  await assert.rejects(
    readIndex(layout),
    (e: unknown) => e instanceof SardeError && /not valid JSON/.test(e.message),
  );
  await Deno.remove(dir, { recursive: true });
});
