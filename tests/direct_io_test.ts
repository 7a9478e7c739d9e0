/**
 * lib/util/direct_io.ts and its users on a real file system (/var/tmp): O_DIRECT writes and reads
 * round-trip, the blob writer and readBlobRange give the same bytes with and without it, and
 * `SARDE_DIRECT_IO=0` turns it off.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { alignedBuffer, DIRECT_ALIGN, openDirect } from "../lib/util/direct_io.ts";
import { digestOf } from "../lib/oci/digest.ts";
import { blobPath, createBlobWriter, openLayout, readBlobRange } from "../lib/oci/layout.ts";
import { MediaType } from "../lib/oci/types.ts";

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "sarde-direct-test-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function randomBytes(n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let off = 0; off < n; off += 65536) crypto.getRandomValues(b.subarray(off, off + 65536));
  return b;
}

async function withEnv(value: string | undefined, fn: () => Promise<void>): Promise<void> {
  const before = Deno.env.get("SARDE_DIRECT_IO");
  if (value === undefined) Deno.env.delete("SARDE_DIRECT_IO");
  else Deno.env.set("SARDE_DIRECT_IO", value);
  try {
    await fn();
  } finally {
    if (before === undefined) Deno.env.delete("SARDE_DIRECT_IO");
    else Deno.env.set("SARDE_DIRECT_IO", before);
  }
}

Deno.test("direct I/O: aligned buffers; writes and reads round-trip; a short read at the end", async () => {
  await withDir(async (dir) => {
    const buf = alignedBuffer(3 * DIRECT_ALIGN);
    const address = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
    assert.equal(address % BigInt(DIRECT_ALIGN), 0n);
    assert.equal(buf.length, 3 * DIRECT_ALIGN);

    const path = join(dir, "f");
    await Deno.writeFile(path, new Uint8Array(0));
    const w = openDirect(path, "write");
    assert.ok(w, "ext4 under /var/tmp takes O_DIRECT");
    buf.set(randomBytes(buf.length));
    await w.write(buf, DIRECT_ALIGN); // at an aligned offset, leaving a hole before it
    w.close();
    w.close(); // idempotent
    const back = await Deno.readFile(path);
    assert.equal(back.length, 4 * DIRECT_ALIGN);
    assert.deepEqual(back.subarray(0, DIRECT_ALIGN), new Uint8Array(DIRECT_ALIGN));
    assert.deepEqual(back.subarray(DIRECT_ALIGN), buf);

    const r = openDirect(path, "read")!;
    const into = alignedBuffer(8 * DIRECT_ALIGN);
    assert.equal(await r.read(into, 2 * DIRECT_ALIGN), 2 * DIRECT_ALIGN, "short read at EOF");
    assert.deepEqual(into.subarray(0, 2 * DIRECT_ALIGN), buf.subarray(DIRECT_ALIGN));
    assert.equal(await r.read(into, 4 * DIRECT_ALIGN), 0);
    r.close();

    await withEnv("0", () => {
      assert.equal(openDirect(path, "read"), undefined, "SARDE_DIRECT_IO=0 turns it off");
      return Promise.resolve();
    });
  });
});

for (const mode of [undefined, "0"]) {
  Deno.test(`direct I/O: blob writer and readBlobRange, unaligned sizes (SARDE_DIRECT_IO=${mode ?? "unset"})`, async () => {
    await withDir(async (dir) => {
      await withEnv(mode, async () => {
        const layout = await openLayout(join(dir, "repo"), { create: true });
        // 2.5 MiB + 123: full 1 MiB pieces, then an unaligned tail written normally.
        const data = randomBytes((5 << 19) + 123);
        const d = { mediaType: MediaType.ociManifest, digest: digestOf(data), size: data.length };
        const w = await createBlobWriter(layout, d);
        for (let off = 0; off < data.length; off += 70_000) {
          await w.write(data.subarray(off, off + 70_000)); // network-sized pieces
        }
        await w.commit();
        assert.deepEqual(await Deno.readFile(blobPath(layout, d.digest)), data);

        // Ranges as uploads read them: from 0, from an unaligned offset (a resumed upload).
        for (const [offset, length] of [[0, data.length], [4097, data.length - 4097], [0, 10]]) {
          const parts: Uint8Array[] = [];
          for await (const p of readBlobRange(layout, d.digest, offset, length)) {
            parts.push(p.slice()); // the buffer is reused for the next piece
          }
          const got = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
          let at = 0;
          for (const p of parts) {
            got.set(p, at);
            at += p.length;
          }
          assert.deepEqual(got, data.subarray(offset, offset + length), `${offset}+${length}`);
        }
      });
    });
  });
}
