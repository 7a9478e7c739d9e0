/**
 * Framed zstd chunks (lib/image/frames.ts): the blob layout read the way zstd's seekable format
 * specification describes it, the verified table, units, single-frame decoding, compatibility
 * with whole-chunk readers, and hostile tables and frames.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import { join } from "node:path";
import {
  type ChunkBlob,
  decodeFrame,
  decodeZstdChunk,
  encodeZstd,
  zeroDigest,
} from "../lib/image/zstd.ts";
import {
  encodeFrameTable,
  type Frame,
  FRAME_SIZE,
  frameTableAnnotation,
  frameTableLocation,
  frameUnits,
  parseFrameTable,
} from "../lib/image/frames.ts";
import { Annotation, type ImageFile } from "../lib/image/format.ts";
import type { Descriptor } from "../lib/oci/types.ts";
import { SardeError } from "../lib/util/errors.ts";
import { run, sarde, tempDir } from "./support/images.ts";
import {
  defineTestVm,
  ensureLibvirtd,
  TEST_URI,
  undefineVms,
  uniqueVmName,
} from "./support/vms.ts";

const MiB = 1 << 20;

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "sarde-frames-test-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const sha256 = (b: Uint8Array) => `sha256:${createHash("sha256").update(b).digest("hex")}`;

/** Compressible, varied bytes (text with numbers), so frames differ in compressed size. */
function textBytes(n: number, seed = 0): Uint8Array {
  const out = new Uint8Array(n);
  const enc = new TextEncoder();
  for (let pos = 0, i = seed; pos < n; i++) {
    const line = enc.encode(`${i} the quick brown fox ${(i * 7919) % 104729} jumps\n`);
    out.set(line.subarray(0, n - pos), pos);
    pos += line.length;
  }
  return out;
}

/**
 * A file of 2 chunks of 9 MiB + 3 MiB of zeros + a 1234-byte tail: chunk 0 is text, chunk 1
 * text with a zero gap, chunk 2 zeros (one unframed blob), chunk 3 a short text tail.
 */
const CHUNK = 9 * MiB;
function makeContent(): Uint8Array {
  const d = new Uint8Array(3 * CHUNK + 1234);
  d.set(textBytes(CHUNK + 4 * MiB), 0);
  d.set(textBytes(3 * MiB, 99), CHUNK + 6 * MiB);
  d.set(textBytes(1234, 7), 3 * CHUNK);
  return d;
}

/** The layer descriptor export writes for a chunk (the annotations a reader uses). */
function layerOf(c: ChunkBlob, index: number, fileSize: number): Descriptor {
  return {
    mediaType: "application/octet-stream+zstd",
    digest: c.digest,
    size: c.size,
    annotations: {
      [Annotation.fileName]: "disk.img",
      [Annotation.fileSize]: String(fileSize),
      [Annotation.chunkIndex]: String(index),
      [Annotation.chunkOffset]: String(c.offset),
      [Annotation.chunkSize]: String(c.length),
      [Annotation.chunkDigest]: c.uncompressedDigest,
      ...(c.table ? { [Annotation.chunkFrames]: frameTableAnnotation(c.table) } : {}),
    },
  };
}

async function encoded(dir: string, content: Uint8Array, name = "disk.img", frameSize?: number) {
  const src = join(dir, name);
  await Deno.writeFile(src, content);
  const outDir = join(dir, `${name}.out`);
  await Deno.mkdir(outDir, { recursive: true });
  const enc = await encodeZstd(src, { chunkSize: CHUNK, outDir, frameSize, concurrency: 2 });
  const layers = enc.chunks.map((c, i) => layerOf(c, i, enc.fileSize));
  return { src, enc, layers };
}

const isIntegrity = (re?: RegExp) => (e: unknown) => {
  assert.ok(e instanceof SardeError, String(e));
  assert.equal(e.kind, "integrity", e.message);
  assert.doesNotMatch(e.message, /\n/);
  if (re) assert.match(e.message, re);
  return true;
};

const u32 = (b: Uint8Array, at: number) =>
  new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(at, true);

Deno.test("frames: a chunk blob is FRAME_SIZE frames, sarde's sha256 frame and a seekable-format seek table", async () => {
  await withDir(async (dir) => {
    const content = makeContent();
    const { enc } = await encoded(dir, content);
    assert.equal(enc.chunks.length, 4);
    assert.deepEqual(
      enc.chunks.map((c) => c.table !== undefined),
      [true, true, false, true],
      "every chunk has a table but the chunk of zeros, which stays one frame",
    );
    assert.equal(enc.chunks[2].uncompressedDigest, zeroDigest(CHUNK));
    for (const c of enc.chunks.filter((c) => c.table)) {
      const blob = await Deno.readFile(c.path);
      const chunk = content.subarray(c.offset, c.offset + c.length);
      // Read as contrib/seekable_format/zstd_seekable_compression_format.md says: the footer is
      // the last 9 bytes, the seek table a skippable frame 0x184D2A5E before it.
      assert.equal(u32(blob, blob.length - 4), 0x8f92eab1, "Seekable_Magic_Number");
      assert.equal(blob[blob.length - 5], 0, "Seek_Table_Descriptor: no checksums");
      const entries = u32(blob, blob.length - 9);
      const seekStart = blob.length - 9 - 8 * entries - 8;
      assert.equal(u32(blob, seekStart), 0x184d2a5e);
      assert.equal(u32(blob, seekStart + 4), 8 * entries + 9);
      const frames = Math.ceil(c.length / FRAME_SIZE);
      assert.equal(entries, frames + 1, "every frame and sarde's skippable frame");
      let at = 0;
      for (let i = 0; i < entries; i++) {
        const csize = u32(blob, seekStart + 8 + 8 * i);
        const dsize = u32(blob, seekStart + 12 + 8 * i);
        if (i < frames) {
          assert.equal(dsize, Math.min(FRAME_SIZE, c.length - i * FRAME_SIZE));
          // Each frame alone is what `zstd -d` makes of the frame's range of the chunk.
          const one = new Deno.Command("zstd", { args: ["-dc"], stdin: "piped", stdout: "piped" })
            .spawn();
          const w = one.stdin.getWriter();
          await w.write(blob.subarray(at, at + csize));
          await w.close();
          const out = await one.output();
          assert.ok(out.success);
          assert.deepEqual(out.stdout, chunk.subarray(i * FRAME_SIZE, i * FRAME_SIZE + dsize));
          // sarde's frame holds its sha256.
          assert.deepEqual(
            blob.subarray(c.table!.offset + 8 + 32 * i, c.table!.offset + 40 + 32 * i),
            new Uint8Array(createHash("sha256").update(out.stdout).digest()),
          );
        } else {
          assert.equal(at, c.table!.offset, "the table starts with sarde's frame");
          assert.equal(u32(blob, at), 0x184d2a53);
          assert.equal(dsize, 0, "a skippable frame decompresses to nothing");
        }
        at += csize;
      }
      assert.equal(at, seekStart, "the entries add up to the seek table's offset");
      assert.equal(c.table!.length, blob.length - c.table!.offset);
      assert.equal(c.table!.digest, sha256(blob.subarray(c.table!.offset)));
      // The whole blob: `zstd -d` and the whole-chunk decoder of older sarde give the chunk.
      const z = await new Deno.Command("zstd", { args: ["-dc", c.path], stdout: "piped" }).output();
      assert.equal(sha256(z.stdout), c.uncompressedDigest);
    }
    const out = join(dir, "out.img");
    (await Deno.open(out, { write: true, create: true })).close();
    await Deno.truncate(out, content.length);
    for (const c of enc.chunks) {
      await decodeZstdChunk(c.path, out, c.offset, c.length, c.uncompressedDigest);
    }
    assert.equal(sha256(await Deno.readFile(out)), enc.fileDigest);
    assert.equal(enc.fileDigest, sha256(content));
  });
});

Deno.test("frames: the verified tables give units that tile the file; decodeFrame returns each frame's bytes", async () => {
  await withDir(async (dir) => {
    const content = makeContent();
    const { enc, layers } = await encoded(dir, content);
    const tables: (Frame[] | undefined)[] = [];
    for (const [i, c] of enc.chunks.entries()) {
      const where = frameTableLocation(layers[i]);
      assert.deepEqual(where, c.table);
      if (!where) {
        tables.push(undefined);
        continue;
      }
      using f = await Deno.open(c.path);
      await f.seek(where.offset, Deno.SeekMode.Start);
      const bytes = new Uint8Array(where.length);
      for (let n = 0; n < bytes.length;) n += (await f.read(bytes.subarray(n)))!;
      tables.push(parseFrameTable(bytes, layers[i]));
    }
    const file: ImageFile = { name: "disk.img", encoding: "zstd", layers, size: content.length };
    const units = frameUnits(file, tables);
    assert.equal(units.length, 5 + 5 + 1 + 1, "9 MiB chunks in 2 MiB frames; zeros; tail");
    let offset = 0;
    for (const u of units) {
      assert.equal(u.offset, offset, "units are contiguous");
      offset += u.length;
      const bytes = content.subarray(u.offset, u.offset + u.length);
      assert.equal(u.digest, sha256(bytes));
      const blob = await Deno.readFile(enc.chunks[layers.indexOf(u.blob)].path);
      if (!u.range) {
        assert.equal(u.digest, zeroDigest(u.length), "only the chunk of zeros is whole");
        continue;
      }
      const frame = blob.subarray(u.range.offset, u.range.offset + u.range.length);
      assert.deepEqual(await decodeFrame(frame, u.length, u.digest), bytes);
    }
    assert.equal(offset, content.length);
    // A chunk whose table was not read cannot pass for a whole chunk.
    assert.throws(() => frameUnits(file, []), /frame table was not read/);
  });
});

Deno.test("frames: a malformed annotation, a tampered or forged table, a tampered frame are integrity errors", async () => {
  await withDir(async (dir) => {
    const content = makeContent();
    const { enc, layers } = await encoded(dir, content);
    const c = enc.chunks[1];
    const layer = layers[1];
    const blob = await Deno.readFile(c.path);
    const table = blob.slice(c.table!.offset);
    const frames = parseFrameTable(table, layer);
    const annotated = (value: string, size = layer.size): Descriptor => ({
      ...layer,
      size,
      annotations: { ...layer.annotations, [Annotation.chunkFrames]: value },
    });
    const { offset, length, digest } = c.table!;
    for (
      const value of [
        "",
        `${offset}:${length}`,
        `${offset}:${length}:sha256:${"A".repeat(64)}`,
        `-1:${length}:${digest}`,
        ` ${offset}:${length}:${digest}`,
        `${offset + 1}:${length}:${digest}`, // past the end of the blob
        `${offset + length - 32}:32:${digest}`, // too short for any table
        `${"9".repeat(16)}:${length}:${digest}`,
      ]
    ) {
      assert.throws(
        () => frameTableLocation(annotated(value)),
        isIntegrity(/chunk 1 of disk\.img/),
      );
    }
    // The table's bytes must be the pinned ones.
    const tampered = table.slice();
    tampered[9] ^= 1;
    assert.throws(() => parseFrameTable(tampered, layer), isIntegrity(/frame table is sha256:/));
    assert.throws(() => parseFrameTable(table.subarray(1), layer), isIntegrity(/bytes, expected/));
    // A table pinned by a forged annotation (a hostile manifest) is still checked against the
    // chunk and the blob.
    const records = frames.map((f) => ({
      compressedSize: f.compressedSize,
      size: f.size,
      sha256: Uint8Array.from(Buffer.from(f.digest.slice(7), "hex")),
    }));
    const forge = (edit: (r: typeof records) => void, why: RegExp) => {
      const r = structuredClone(records);
      edit(r);
      const bytes = encodeFrameTable(r);
      const at = r.reduce((n, f) => n + f.compressedSize, 0);
      const forged = annotated(
        frameTableAnnotation({ offset: at, length: bytes.length, digest: sha256(bytes) }),
        at + bytes.length,
      );
      assert.throws(() => parseFrameTable(bytes, forged), isIntegrity(why));
    };
    forge((r) => r[0].size += 1, /frames of \d+ bytes in all, the chunk has/);
    forge((r) => r[0].size = 0, /has a frame 0 of/);
    forge((r) => r[1].compressedSize = 0, /has a frame 1 of/);
    forge((r) => r[0].size = 65 * MiB, /has a frame 0 of/);
    forge((r) => r.pop(), /bytes in all/);
    {
      // Frames ending elsewhere than the table (a blob with more than the table says).
      const bytes = encodeFrameTable(records);
      const forged = annotated(
        frameTableAnnotation({ offset: offset + 10, length, digest: sha256(bytes) }),
        offset + 10 + length,
      );
      assert.throws(() => parseFrameTable(bytes, forged), isIntegrity(/do not end where/));
      // Bytes with the right digest but not sarde's layout (magic changed).
      const odd = bytes.slice();
      odd[0] ^= 1;
      const oddLayer = annotated(frameTableAnnotation({ offset, length, digest: sha256(odd) }));
      assert.throws(() => parseFrameTable(odd, oddLayer), isIntegrity(/not in sarde's layout/));
    }
    // Frames: only the exact verified bytes come out.
    const f = frames[1]; // text: a frame of zeros would be shorter than the truncation below
    const frame = blob.slice(f.offset, f.offset + f.compressedSize);
    const expected = content.subarray(c.offset + f.chunkOffset, c.offset + f.chunkOffset + f.size);
    assert.deepEqual(await decodeFrame(frame, f.size, f.digest), expected);
    // Handed over, a whole array moves to the worker (empty here afterwards); a view of part of
    // a larger array is copied, never taken.
    const mine = frame.slice();
    assert.deepEqual(await decodeFrame(mine, f.size, f.digest, { handOver: true }), expected);
    assert.equal(mine.byteLength, 0);
    const larger = new Uint8Array(frame.length + 1);
    larger.set(frame);
    const view = larger.subarray(0, frame.length);
    assert.deepEqual(await decodeFrame(view, f.size, f.digest, { handOver: true }), expected);
    assert.deepEqual(view, frame);
    const bad = frame.slice();
    bad[bad.length >> 1] ^= 0x55;
    await assert.rejects(decodeFrame(bad, f.size, f.digest), isIntegrity(/zstd frame/));
    await assert.rejects(decodeFrame(frame, f.size - 1, f.digest), isIntegrity(/declares/));
    await assert.rejects(decodeFrame(frame, f.size, frames[0].digest), isIntegrity(/content is/));
    await assert.rejects(decodeFrame(frame.subarray(0, 100), f.size, f.digest), isIntegrity());
    const two = new Uint8Array(frame.length * 2);
    two.set(frame);
    two.set(frame, frame.length);
    await assert.rejects(decodeFrame(two, f.size, f.digest), isIntegrity(/bytes of frame/));
    await assert.rejects(decodeFrame(table, 1, f.digest), isIntegrity());
    await assert.rejects(decodeFrame(frame, 65 * MiB, f.digest), (e) => {
      assert.ok(e instanceof SardeError && e.kind === "usage");
      return true;
    });
  });
});

Deno.test("frames: unchanged chunks give identical blobs and tables across exports; frameSize 0 writes single frames", async () => {
  await withDir(async (dir) => {
    const content = makeContent();
    const a = await encoded(dir, content, "a.img");
    const changed = content.slice();
    changed.set(textBytes(MiB, 5), CHUNK + 3 * MiB); // inside chunk 1 only
    const b = await encoded(dir, changed, "b.img");
    const strip = (c: ChunkBlob) => ({ ...c, path: "" });
    for (const i of [0, 2, 3]) assert.deepEqual(strip(b.enc.chunks[i]), strip(a.enc.chunks[i]));
    assert.deepEqual(b.layers[0], a.layers[0]);
    assert.notEqual(b.enc.chunks[1].digest, a.enc.chunks[1].digest);
    // Frames outside the change keep their digests and compressed sizes.
    const table = async (x: typeof a) => {
      const t = x.enc.chunks[1].table!;
      return parseFrameTable(
        (await Deno.readFile(x.enc.chunks[1].path)).slice(t.offset),
        x.layers[1],
      );
    };
    const [ta, tb] = [await table(a), await table(b)];
    assert.deepEqual(
      ta.map((f, i) => f.digest === tb[i].digest),
      [true, false, true, true, true],
      "only the frame holding the change (3–4 MiB) differs",
    );
    // frameSize 0: one frame per chunk without a table, as sarde wrote before frames.
    const old = await encoded(dir, content, "old.img", 0);
    for (const c of old.enc.chunks) {
      assert.equal(c.table, undefined);
      const list = await new Deno.Command("zstd", { args: ["-lv", c.path], stdout: "piped" })
        .output();
      assert.match(new TextDecoder().decode(list.stdout), /# Zstandard Frames: 1\n/);
    }
    assert.equal(old.enc.chunks[2].digest, a.enc.chunks[2].digest, "one blob of zeros for both");
    assert.equal(frameTableLocation(old.layers[0]), undefined);
  });
});

// ------------------------------------------------------------------------------------------------
// Images: export writes tables, import reads framed images and those of older sarde.

const env = { LIBVIRT_DEFAULT_URI: TEST_URI };
const vmOpts = { sanitizeResources: false, sanitizeOps: false };

/** The manifest of the only image of an OCI layout, and a reader of its blobs. */
async function storedImage(layout: string) {
  const blob = (d: string) => join(layout, "blobs", "sha256", d.slice(7));
  const index = JSON.parse(await Deno.readTextFile(join(layout, "index.json")));
  const manifest = JSON.parse(await Deno.readTextFile(blob(index.manifests[0].digest)));
  return { manifest: manifest as { layers: Descriptor[] }, blob };
}

Deno.test({
  name: "frames: export pins a verified table on every chunk but zeros; the image imports",
  ...vmOpts,
  fn: async () => {
    await ensureLibvirtd();
    await using vm = await defineTestVm({ rawDisk: true });
    const work = await tempDir("frames-export");
    const name = uniqueVmName("sarde-frames-new");
    try {
      const store = join(work, "s");
      const exp = await sarde(["export", "-d", store, "--chunksize", "4MiB", vm.name, "l/f:v1"], {
        env,
      });
      assert.equal(exp.code, 0, exp.stderr);
      const { manifest, blob } = await storedImage(join(store, "l", "f"));
      const chunks = manifest.layers.filter((l) => l.mediaType.endsWith("+zstd"));
      let framed = 0;
      for (const l of chunks) {
        const where = frameTableLocation(l);
        const a = l.annotations!;
        if (!where) {
          assert.equal(a[Annotation.chunkDigest], zeroDigest(Number(a[Annotation.chunkSize])));
          continue;
        }
        framed++;
        const bytes = (await Deno.readFile(blob(l.digest))).subarray(where.offset);
        const frames = parseFrameTable(bytes, l);
        assert.equal(frames.length, Math.ceil(Number(a[Annotation.chunkSize]) / FRAME_SIZE));
      }
      assert.ok(framed > 0 && framed < chunks.length, `${framed} of ${chunks.length} framed`);
      const imp = await sarde([
        "import",
        "-d",
        store,
        "--vmdir",
        join(work, "vms"),
        "-n",
        name,
        "l/f:v1",
      ], {
        env,
      });
      assert.equal(imp.code, 0, imp.stderr);
      for (const d of vm.disks) {
        const copy = join(work, "vms", name, d.path.split("/").at(-1)!);
        assert.equal((await run("cmp", [d.path, copy])).code, 0, `${copy} is the disk`);
      }
    } finally {
      await undefineVms([name]);
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name: "frames: an image of older sarde (one frame per chunk, no table) still imports",
  ...vmOpts,
  fn: async () => {
    await ensureLibvirtd();
    const work = await tempDir("frames-old");
    const name = uniqueVmName("sarde-frames-old");
    try {
      // Exported by sarde 306f193 (before frames) from a test VM, `--chunksize 1M`.
      const store = join(work, "s");
      await Deno.mkdir(store);
      const fixture = new URL("./fixtures/old-zstd-image.tar.gz", import.meta.url).pathname;
      await run("tar", ["-xzf", fixture, "-C", store], { check: true });
      const { manifest } = await storedImage(join(store, "local", "old-zstd"));
      const chunks = manifest.layers.filter((l) => l.mediaType.endsWith("+zstd"));
      assert.ok(chunks.length > 60);
      assert.ok(chunks.every((l) => frameTableLocation(l) === undefined), "no tables");
      const vmdir = join(work, "vms");
      const imp = await sarde([
        "import",
        "-d",
        store,
        "--vmdir",
        vmdir,
        "-n",
        name,
        "local/old-zstd:v1",
      ], {
        env,
      });
      assert.equal(imp.code, 0, imp.stderr);
      // Every file is the one the image pins (import verified chunks and file digests too).
      const files = new Map(chunks.map((l) => [l.annotations![Annotation.fileName], l]));
      for (const [file, l] of files) {
        const bytes = await Deno.readFile(join(vmdir, name, file!));
        assert.equal(sha256(bytes), l.annotations![Annotation.fileDigest], file);
      }
    } finally {
      await undefineVms([name]);
      await Deno.remove(work, { recursive: true });
    }
  },
});
