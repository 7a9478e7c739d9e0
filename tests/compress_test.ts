/**
 * lib/image/zstd.ts and lib/image/gzip.ts on real files under /var/tmp: zstd chunks (round trip,
 * sparseness, determinism, frames the zstd CLI reads, boundaries, corruption, interruption) and
 * sardinecake 0.4's gzip layout (header bytes, python3's gzip module both ways, pieces, errors).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { runInterruptActions } from "../lib/util/cleanup.ts";
import { decodeGzip, encodeGzip } from "../lib/image/gzip.ts";
import { parseGzipHeader } from "../lib/image/gzip_header.ts";
import { type ChunkBlob, decodeZstdChunk, encodeZstd } from "../lib/image/zstd.ts";
import { FRAME_SIZE } from "../lib/image/frames.ts";
import { digestFile, digestOf } from "../lib/oci/digest.ts";
import { SardeError } from "../lib/util/errors.ts";
import { forEachConcurrent } from "../lib/util/pool.ts";

const MiB = 1 << 20;

async function withDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ dir: "/var/tmp", prefix: "sarde-compress-test-" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function run(
  cmd: string,
  args: string[],
  stdin?: Uint8Array,
): Promise<{ code: number; stdout: Uint8Array; stderr: string }> {
  const child = new Deno.Command(cmd, {
    args,
    stdin: stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (stdin) {
    const w = child.stdin.getWriter();
    await w.write(stdin);
    await w.close();
  }
  const out = await child.output();
  return { code: out.code, stdout: out.stdout, stderr: new TextDecoder().decode(out.stderr) };
}

async function sh(script: string): Promise<string> {
  const r = await run("sh", ["-c", script]);
  assert.equal(r.code, 0, `${script}: ${r.stderr}`);
  return new TextDecoder().decode(r.stdout).trim();
}

async function python(code: string, ...args: string[]): Promise<string> {
  const r = await run("python3", ["-c", code, ...args]);
  assert.equal(r.code, 0, r.stderr);
  return new TextDecoder().decode(r.stdout).trim();
}

function randomBytes(n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let off = 0; off < n; off += 65536) crypto.getRandomValues(b.subarray(off, off + 65536));
  return b;
}

function textBytes(n: number): Uint8Array {
  const line = (i: number) => `${i} the quick brown fox jumps over the lazy dog ${i * 7919}\n`;
  let s = "";
  for (let i = 0; s.length < n; i++) s += line(i);
  return new TextEncoder().encode(s.slice(0, n));
}

/** Writes `parts` at their offsets and truncates to `size`; unwritten ranges stay holes. */
async function makeFile(path: string, size: number, parts: [number, Uint8Array][]) {
  using f = await Deno.open(path, { write: true, create: true, truncate: true });
  for (const [off, data] of parts) {
    await f.seek(off, Deno.SeekMode.Start);
    let n = 0;
    while (n < data.length) n += await f.write(data.subarray(n));
  }
  await f.truncate(size);
}

/**
 * 37 MiB + 777 B: random, text, written zeros, a 14 MiB hole, random. Hole and written-zero
 * chunks of 4 MiB line up at 12–20 MiB and 20–32 MiB.
 */
const MIXED_SIZE = 37 * MiB + 777;
async function makeMixed(path: string) {
  await makeFile(path, MIXED_SIZE, [
    [0, randomBytes(6 * MiB)],
    [6 * MiB, textBytes(6 * MiB)],
    [12 * MiB, new Uint8Array(8 * MiB)],
    [34 * MiB, randomBytes(3 * MiB + 777)],
  ]);
}

const allocated = async (path: string) => Number(await sh(`stat -c %b '${path}'`)) * 512;

async function emptyDir(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(dir)) names.push(e.name);
  return names;
}

async function decodeAll(chunks: ChunkBlob[], size: number, out: string, concurrency = 3) {
  using f = await Deno.open(out, { write: true, create: true, truncate: true });
  await f.truncate(size);
  await forEachConcurrent(
    chunks,
    concurrency,
    (c) => decodeZstdChunk(c.path, out, c.offset, c.length, c.uncompressedDigest),
  );
}

const isKind = (kind: string) => (e: unknown) => e instanceof SardeError && e.kind === kind;

// ------------------------------------------------------------------------------------------------
// zstd

Deno.test("zstd: mixed sparse file round trip is byte-identical and stays sparse", async () => {
  await withDir(async (dir) => {
    const src = join(dir, "disk.img");
    const out = join(dir, "out.img");
    const blobs = join(dir, "blobs");
    await Deno.mkdir(blobs);
    await makeMixed(src);
    let progress = 0;
    const enc = await encodeZstd(src, {
      chunkSize: 4 * MiB,
      outDir: blobs,
      onProgress: (n) => progress += n,
    });
    assert.equal(enc.fileSize, MIXED_SIZE);
    assert.equal(progress, MIXED_SIZE);
    assert.equal(enc.fileDigest, (await digestFile(src)).digest);
    assert.equal(enc.fileDigest, `sha256:${(await sh(`sha256sum '${src}'`)).slice(0, 64)}`);
    assert.equal(enc.chunks.length, 10);
    let next = 0;
    for (const c of enc.chunks) {
      assert.equal(c.offset, next, "chunks are contiguous");
      next += c.length;
      assert.ok(c.path.startsWith(blobs + "/"));
      assert.deepEqual(await digestFile(c.path), { digest: c.digest, size: c.size });
      const range = await sh(
        `dd if='${src}' bs=1M iflag=skip_bytes,count_bytes skip=${c.offset} count=${c.length} status=none | sha256sum`,
      );
      assert.equal(c.uncompressedDigest, `sha256:${range.slice(0, 64)}`);
    }
    assert.equal(next, MIXED_SIZE);
    assert.equal(enc.chunks.at(-1)!.length, MIXED_SIZE - 9 * 4 * MiB);
    // Written zeros (chunks 3, 4) and holes (5, 6, 7) give one and the same blob.
    const zeroDigests = new Set(enc.chunks.slice(3, 8).map((c) => c.digest));
    assert.equal(zeroDigests.size, 1);
    assert.ok(enc.chunks[5].size < 1024, "a 4 MiB zero chunk compresses to a few bytes");

    await decodeAll(enc.chunks, enc.fileSize, out);
    assert.equal((await digestFile(out)).digest, enc.fileDigest);
    await sh(`cmp '${src}' '${out}'`);
    // Zero 4 MiB blocks became holes: 0–12 MiB and 32–37 MiB hold data, 12–32 MiB nothing.
    const [inAlloc, outAlloc] = [await allocated(src), await allocated(out)];
    assert.ok(outAlloc <= 18 * MiB, `output allocates ${outAlloc} B`);
    assert.ok(outAlloc < inAlloc, `output ${outAlloc} B < input ${inAlloc} B`);
    assert.deepEqual(
      (await emptyDir(blobs)).sort(),
      enc.chunks.map((c) => c.path.slice(blobs.length + 1)).sort(),
    );
  });
});

Deno.test("zstd: encoding is repeatable for any thread count; frames are what the zstd CLI reads", async () => {
  await withDir(async (dir) => {
    const src = join(dir, "disk.img");
    await makeMixed(src);
    const chunkSize = 5 * MiB + 123; // not 4 MiB aligned: decode blocks start mid-chunk
    const runs = [];
    for (const concurrency of [1, 2, 3]) {
      const outDir = join(dir, `o${concurrency}`);
      await Deno.mkdir(outDir);
      runs.push(await encodeZstd(src, { chunkSize, outDir, concurrency }));
    }
    const strip = (e: { chunks: ChunkBlob[] }) => e.chunks.map(({ path: _, ...rest }) => rest);
    assert.deepEqual(strip(runs[1]), strip(runs[0]));
    assert.deepEqual(strip(runs[2]), strip(runs[0]));
    assert.equal(runs[1].fileDigest, runs[0].fileDigest);
    // Every blob is frames of FRAME_SIZE bytes and the two skippable frames of their table (a
    // chunk of zeros: one frame), with content sizes and checksums, which `zstd -d` decodes to
    // exactly the chunk's bytes.
    for (const c of runs[1].chunks) {
      const list = await sh(`zstd -lv '${c.path}'`);
      const frames = c.table ? Math.ceil(c.length / FRAME_SIZE) : 1;
      assert.match(list, new RegExp(`# Zstandard Frames: ${frames}\n`), `chunk at ${c.offset}`);
      if (c.table) assert.match(list, /# Skippable Frames: 2\n/);
      assert.match(list, new RegExp(`Decompressed Size: .*\\(${c.length} B\\)`));
      assert.match(list, /Check: XXH64/);
      const ref = await sh(
        `dd if='${src}' bs=1M iflag=skip_bytes,count_bytes skip=${c.offset} count=${c.length} status=none | sha256sum`,
      );
      assert.equal(await sh(`zstd -d -c '${c.path}' | sha256sum`), ref, `chunk at ${c.offset}`);
    }
    // Unaligned chunks decode right, in parallel, into one file.
    const out = join(dir, "out.img");
    await decodeAll(runs[1].chunks, MIXED_SIZE, out, 4);
    await sh(`cmp '${src}' '${out}'`);
    // Decoding with `zstd -d` of the concatenated frames gives the file too.
    const cat = runs[1].chunks.map((c) => `'${c.path}'`).join(" ");
    assert.equal(
      await sh(`cat ${cat} | zstd -d -c | sha256sum`),
      await sh(`sha256sum < '${src}'`),
    );
  });
});

Deno.test("zstd: boundaries: empty file, file smaller than a chunk, exact multiple", async () => {
  await withDir(async (dir) => {
    const empty = join(dir, "empty.img");
    await Deno.writeFile(empty, new Uint8Array(0));
    const e = await encodeZstd(empty, { chunkSize: MiB, outDir: dir });
    assert.equal(e.fileSize, 0);
    assert.equal(e.fileDigest, digestOf(""));
    assert.equal(e.chunks.length, 1, "an empty file still has one (empty) chunk");
    assert.deepEqual(
      { offset: e.chunks[0].offset, length: e.chunks[0].length, u: e.chunks[0].uncompressedDigest },
      { offset: 0, length: 0, u: digestOf("") },
    );
    const eOut = join(dir, "empty.out");
    await decodeAll(e.chunks, 0, eOut);
    assert.equal((await Deno.stat(eOut)).size, 0);

    const small = join(dir, "small.img");
    const data = textBytes(100_000);
    await Deno.writeFile(small, data);
    const s = await encodeZstd(small, { chunkSize: MiB, outDir: dir });
    assert.equal(s.chunks.length, 1);
    assert.equal(s.chunks[0].length, 100_000);
    assert.equal(s.chunks[0].uncompressedDigest, digestOf(data));
    assert.equal(s.fileDigest, digestOf(data));
    const sOut = join(dir, "small.out");
    await decodeAll(s.chunks, s.fileSize, sOut);
    assert.deepEqual(await Deno.readFile(sOut), data);

    const exact = join(dir, "exact.img");
    const data2 = randomBytes(3 * 65536);
    await Deno.writeFile(exact, data2);
    const x = await encodeZstd(exact, { chunkSize: 65536, outDir: dir });
    assert.deepEqual(x.chunks.map((c) => [c.offset, c.length]), [[0, 65536], [65536, 65536], [
      131072,
      65536,
    ]]);
    const xOut = join(dir, "exact.out");
    await decodeAll(x.chunks, x.fileSize, xOut);
    assert.deepEqual(await Deno.readFile(xOut), data2);

    // A file that is one big hole, smaller than a chunk.
    const hole = join(dir, "hole.img");
    await makeFile(hole, 3 * MiB + 5, []);
    const h = await encodeZstd(hole, { chunkSize: 8 * MiB, outDir: dir });
    assert.equal(h.chunks.length, 1);
    assert.equal(h.fileDigest, digestOf(new Uint8Array(3 * MiB + 5)));
    assert.equal(h.chunks[0].uncompressedDigest, h.fileDigest);
    assert.equal(
      await sh(`zstd -d -c '${h.chunks[0].path}' | sha256sum`),
      await sh(`head -c ${3 * MiB + 5} /dev/zero | sha256sum`),
    );

    await assert.rejects(encodeZstd(small, { chunkSize: 0, outDir: dir }), isKind("usage"));
    await assert.rejects(
      encodeZstd(join(dir, "missing.img"), { chunkSize: MiB, outDir: dir }),
      isKind("not-found"),
    );
  });
});

Deno.test("zstd: a corrupt blob or a wrong digest is an integrity error and leaves zeros", async () => {
  await withDir(async (dir) => {
    const src = join(dir, "disk.img");
    const data = new Uint8Array(12 * MiB);
    data.set(randomBytes(5 * MiB), 0);
    data.set(textBytes(7 * MiB), 5 * MiB);
    await Deno.writeFile(src, data);
    const enc = await encodeZstd(src, { chunkSize: 6 * MiB, outDir: dir });
    const out = join(dir, "out.img");
    const fresh = async () => {
      using f = await Deno.open(out, { write: true, create: true, truncate: true });
      await f.truncate(enc.fileSize);
    };
    const assertUntouched = async () => {
      assert.equal(await allocated(out), 0, "no decoded data left behind");
      assert.equal((await Deno.stat(out)).size, enc.fileSize);
      assert.equal((await digestFile(out)).digest, digestOf(new Uint8Array(enc.fileSize)));
    };
    const [c0, c1] = enc.chunks;

    // One flipped byte inside the random (stored) data: only zstd's checksum at the end sees it.
    const bad = join(dir, "bad.zst");
    const blob = await Deno.readFile(c0.path);
    blob[Math.floor(blob.length / 2)] ^= 0x55;
    await Deno.writeFile(bad, blob);
    await fresh();
    await assert.rejects(
      decodeZstdChunk(bad, out, c0.offset, c0.length, c0.uncompressedDigest),
      isKind("integrity"),
    );
    await assertUntouched();

    // Truncated blob.
    await Deno.writeFile(bad, blob.subarray(0, blob.length - 100));
    await assert.rejects(
      decodeZstdChunk(bad, out, c0.offset, c0.length, c0.uncompressedDigest),
      isKind("integrity"),
    );
    await assertUntouched();

    // A valid frame that asks for a 128 MiB window (a memory bomb for a decoder that trusts it).
    const wide = join(dir, "wide.zst");
    await sh(`zstd -dc '${c0.path}' | zstd -q -3 --zstd=wlog=27 -c > '${wide}'`);
    assert.match(await sh(`zstd -lv '${wide}'`), /Window Size: 128 MiB/);
    await assert.rejects(
      decodeZstdChunk(wide, out, c0.offset, c0.length, c0.uncompressedDigest),
      (e: unknown) => isKind("integrity")(e) && /memory|window/i.test((e as Error).message),
    );
    await assertUntouched();

    // A valid blob that does not match the expected digest or length.
    await assert.rejects(
      decodeZstdChunk(c1.path, out, c1.offset, c1.length, c0.uncompressedDigest),
      isKind("integrity"),
    );
    await assertUntouched();
    await assert.rejects(
      decodeZstdChunk(c1.path, out, c1.offset, c1.length - 1, c1.uncompressedDigest),
      isKind("integrity"),
    );
    await assertUntouched();
    await assert.rejects(
      decodeZstdChunk(join(dir, "nope.zst"), out, 0, 10, c1.uncompressedDigest),
      isKind("not-found"),
    );

    // And the good blobs still decode.
    await decodeAll(enc.chunks, enc.fileSize, out);
    assert.deepEqual(await Deno.readFile(out), data);
  });
});

Deno.test("zstd: decoded by pieces, a chunk writes only the verified pieces it is told to", async () => {
  await withDir(async (dir) => {
    const src = join(dir, "disk.img");
    const data = new Uint8Array(12 * MiB);
    data.set(randomBytes(5 * MiB), 0);
    data.set(textBytes(7 * MiB), 5 * MiB);
    await Deno.writeFile(src, data);
    const [c] = (await encodeZstd(src, { chunkSize: 12 * MiB, outDir: dir })).chunks;
    const out = join(dir, "out.img");
    const pieces = (size: number, write = (_k: number) => true) =>
      Array.from({ length: data.length / size }, (_, k) => ({
        length: size,
        digest: digestOf(data.subarray(k * size, (k + 1) * size)),
        write: write(k),
      }));
    const decode = (p: ReturnType<typeof pieces>) =>
      decodeZstdChunk(c.path, out, 0, c.length, c.uncompressedDigest, { pieces: p });
    const piece = (bytes: Uint8Array, k: number) => bytes.subarray(k * 2 * MiB, (k + 1) * 2 * MiB);

    // Pieces 1 and 4 hold someone else's bytes (a lazy file's present units): left alone.
    const before = new Uint8Array(data.length);
    piece(before, 1).fill(0xaa);
    piece(before, 4).fill(0xaa);
    await Deno.writeFile(out, before);
    await decode(pieces(2 * MiB, (k) => k !== 1 && k !== 4));
    const got = await Deno.readFile(out);
    for (let k = 0; k < 6; k++) {
      const want = piece(k === 1 || k === 4 ? before : data, k);
      assert.equal(digestOf(piece(got, k)), digestOf(want), `piece ${k}`);
    }

    // A piece that does not verify stops the decode: the verified pieces before it are written,
    // it and the rest are not, and nothing is rolled back.
    await Deno.writeFile(out, new Uint8Array(data.length));
    const wrong = pieces(2 * MiB);
    wrong[3].digest = wrong[2].digest;
    await assert.rejects(decode(wrong), isKind("integrity"));
    const partial = await Deno.readFile(out);
    assert.equal(digestOf(partial.subarray(0, 6 * MiB)), digestOf(data.subarray(0, 6 * MiB)));
    assert.ok(partial.subarray(6 * MiB).every((b) => b === 0), "unverified bytes were written");

    // Pieces larger than the worker's 4 MiB buffer; pieces that do not tile the chunk.
    await Deno.writeFile(out, new Uint8Array(data.length));
    await decode(pieces(6 * MiB));
    assert.equal(digestOf(await Deno.readFile(out)), digestOf(data));
    await assert.rejects(decode(pieces(6 * MiB).slice(1)), isKind("usage"));
  });
});

// The workers' write errors come from lib/util/fsutil.ts's osReason, whose source the worker
// script carries (lib/image/codec_worker.ts): a full tmpfs of 1 MiB makes them happen.
Deno.test({
  name: "zstd: a full file system fails encode and decode with its reason, naming the file written",
  ignore: Deno.uid() !== 0, // mounting a tmpfs needs root
  fn: async () => {
    await withDir(async (dir) => {
      const src = join(dir, "disk.img");
      await Deno.writeFile(src, randomBytes(8 * MiB));
      const enc = await encodeZstd(src, { chunkSize: 8 * MiB, outDir: dir });
      const full = join(dir, "full");
      await Deno.mkdir(full);
      await sh(`mount -t tmpfs -o size=1m tmpfs '${full}'`);
      try {
        const out = join(full, "out.img");
        await Deno.writeFile(out, new Uint8Array(0));
        await Deno.truncate(out, enc.fileSize); // sparse: takes no space yet
        const [c] = enc.chunks;
        await assert.rejects(
          decodeZstdChunk(c.path, out, c.offset, c.length, c.uncompressedDigest),
          (e: unknown) =>
            isKind("io")(e) &&
            (e as Error).message.includes(`cannot write ${out}: no space left on device`),
        );
        assert.equal(await allocated(out), 0, "what was written is rolled back");

        await assert.rejects(
          encodeZstd(src, { chunkSize: 8 * MiB, outDir: full }),
          (e: unknown) =>
            isKind("io")(e) &&
            new RegExp(`cannot write ${full}/\\.sarde-[^:]+: no space left on device`)
              .test((e as Error).message),
        );
        assert.deepEqual(await emptyDir(full), ["out.img"], "no temp file left");
      } finally {
        await sh(`umount '${full}'`);
      }
    });
  },
});

Deno.test("zstd: an aborted encode removes its temp files and says 'interrupted'", async () => {
  await withDir(async (dir) => {
    const src = join(dir, "disk.img");
    await makeMixed(src);
    const outDir = join(dir, "blobs");
    await Deno.mkdir(outDir);
    const ac = new AbortController();
    let seen = 0;
    await assert.rejects(
      encodeZstd(src, {
        chunkSize: 2 * MiB,
        outDir,
        signal: ac.signal,
        onProgress: (n) => {
          seen += n;
          if (seen > 10 * MiB) ac.abort(new Error("test"));
        },
      }),
      isKind("interrupted"),
    );
    assert.deepEqual(await emptyDir(outDir), []);

    // Ctrl-C: the process exits right after the interrupt actions, so they must clean up alone.
    const ac2 = new AbortController();
    let cleaned: Promise<void> | undefined;
    seen = 0;
    await assert.rejects(
      encodeZstd(src, {
        chunkSize: 2 * MiB,
        outDir,
        signal: ac2.signal,
        onProgress: (n) => {
          seen += n;
          if (seen > 10 * MiB && !cleaned) {
            ac2.abort(new Error("SIGINT"));
            cleaned = runInterruptActions();
          }
        },
      }),
      isKind("interrupted"),
    );
    await cleaned;
    assert.deepEqual(await emptyDir(outDir), []);
  });
});

// ------------------------------------------------------------------------------------------------
// gzip

const MTIME = 1_714_567_890; // 2024-05-01

/** Python's view of a gzip stream: content digest, GzipFile.mtime and the FNAME as 0.4 reads it. */
const PY_READ = `
import gzip, hashlib, io, sys
data = b"".join(open(p, "rb").read() for p in sys.argv[1:])
# FNAME the way an importer parses the first header (RFC 1952)
flg = data[3]
pos = 10
if flg & 4:
    pos += 2 + int.from_bytes(data[10:12], "little")
name = None
if flg & 8:
    end = data.index(b"\\0", pos)
    name = data[pos:end].decode("latin-1")
with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
    content = g.read()
    mtime = g.mtime
print(hashlib.sha256(content).hexdigest(), mtime, name)
`;

Deno.test("gzip: header bytes are Python's; pieces decode with gzip -dc and python3", async () => {
  await withDir(async (dir) => {
    const src = join(dir, "disk.qcow2");
    await makeMixed(src);
    const outDir = join(dir, "blobs");
    await Deno.mkdir(outDir);
    let progress = 0;
    const enc = await encodeGzip(src, {
      storedName: "disk.qcow2",
      mtime: MTIME,
      chunkSize: 3 * MiB,
      outDir,
      onProgress: (n) => progress += n,
    });
    assert.equal(progress, MIXED_SIZE);
    assert.equal(enc.fileSize, MIXED_SIZE);
    assert.equal(enc.fileDigest, (await digestFile(src)).digest);
    assert.ok(enc.pieces.length >= 2);
    for (const [i, p] of enc.pieces.entries()) {
      assert.deepEqual(await digestFile(p.path), { digest: p.digest, size: p.size });
      if (i < enc.pieces.length - 1) assert.equal(p.size, 3 * MiB);
    }
    const head = (await Deno.readFile(enc.pieces[0].path)).subarray(0, 21);
    const mt = [MTIME & 0xff, (MTIME >> 8) & 0xff, (MTIME >> 16) & 0xff, MTIME >>> 24];
    assert.deepEqual(
      [...head],
      [0x1f, 0x8b, 0x08, 0x08, ...mt, 0x00, 0xff, ...new TextEncoder().encode("disk.qcow2"), 0],
    );
    // Byte for byte what Python's GzipFile writes at level 6 for that name and mtime.
    const pyHead = await python(
      `import gzip,io,sys
b = io.BytesIO()
gzip.GzipFile(filename=sys.argv[1], mode="wb", compresslevel=6, fileobj=b, mtime=int(sys.argv[2])).close()
print(b.getvalue()[:21].hex())`,
      "disk.qcow2",
      String(MTIME),
    );
    assert.equal(Array.from(head, (b) => b.toString(16).padStart(2, "0")).join(""), pyHead);

    const paths = enc.pieces.map((p) => `'${p.path}'`).join(" ");
    const hex = enc.fileDigest.slice(7);
    assert.equal((await sh(`cat ${paths} | gzip -dc | sha256sum`)).slice(0, 64), hex);
    assert.equal(
      await python(PY_READ, ...enc.pieces.map((p) => p.path)),
      `${hex} ${MTIME} disk.qcow2`,
    );

    const out = join(dir, "out.img");
    const dec = await decodeGzip(enc.pieces.map((p) => p.path), out, {
      expectedDigest: enc.fileDigest,
    });
    assert.equal(dec.size, MIXED_SIZE);
    assert.equal(dec.digest, enc.fileDigest);
    assert.deepEqual(dec.header, {
      flags: 8,
      mtime: MTIME,
      xfl: 0,
      os: 255,
      name: "disk.qcow2",
      headerLength: 21,
    });
    await sh(`cmp '${src}' '${out}'`);
    assert.ok(await allocated(out) <= 18 * MiB, "zero blocks became holes");
  });
});

Deno.test("gzip: stored names follow Python (basename, .gz stripped, Latin-1); others refused", async () => {
  await withDir(async (dir) => {
    const src = join(dir, "x");
    await Deno.writeFile(src, textBytes(5000));
    const cases: [string, string | null][] = [
      ["a.gz", "a"],
      ["dir/b.qcow2", "b.qcow2"],
      ["café.img", "café.img"],
      [".gz", null],
      ["", null],
    ];
    for (const [name, want] of cases) {
      const enc = await encodeGzip(src, { storedName: name, mtime: 0, chunkSize: 0, outDir: dir });
      assert.equal(enc.pieces.length, 1);
      const got = await python(PY_READ, enc.pieces[0].path);
      assert.equal(got.split(" ").slice(1).join(" "), `0 ${want ?? "None"}`, name);
      const bytes = await Deno.readFile(enc.pieces[0].path);
      assert.equal(bytes[3], want === null ? 0 : 8, `FLG for '${name}'`);
      assert.equal(parseGzipHeader(bytes).name, want ?? undefined);
      await Deno.remove(enc.pieces[0].path);
    }
    for (const name of ["диск.qcow2", "disk-☃.img", "a\0b"]) {
      await assert.rejects(
        encodeGzip(src, { storedName: name, mtime: MTIME, chunkSize: 0, outDir: dir }),
        isKind("usage"),
        name,
      );
    }
    await assert.rejects(
      encodeGzip(src, { storedName: "d", mtime: 2 ** 32, chunkSize: 0, outDir: dir }),
      isKind("usage"),
    );
    assert.deepEqual((await emptyDir(dir)).sort(), ["x"], "no temp files left");
  });
});

Deno.test("gzip: decodeGzip reads Python-written streams (FNAME, multi-member, all header fields)", async () => {
  await withDir(async (dir) => {
    const data = new Uint8Array(9 * MiB);
    data.set(textBytes(3 * MiB), 0);
    data.set(randomBytes(MiB), 8 * MiB);
    const src = join(dir, "src.img");
    await Deno.writeFile(src, data);
    const gz = join(dir, "py.gz");
    // As sardinecake 0.4 writes it, cut into two pieces at an odd offset.
    await python(
      `import gzip,sys
with open(sys.argv[1], "rb") as f, open(sys.argv[2], "wb") as raw:
    with gzip.GzipFile(filename="disk.qcow2", mode="wb", compresslevel=6, fileobj=raw, mtime=${MTIME}) as g:
        g.write(f.read())`,
      src,
      gz,
    );
    const whole = await Deno.readFile(gz);
    const p1 = join(dir, "p1");
    const p2 = join(dir, "p2");
    await Deno.writeFile(p1, whole.subarray(0, 15)); // the header spans both pieces
    await Deno.writeFile(p2, whole.subarray(15));
    const out = join(dir, "out.img");
    const dec = await decodeGzip([p1, p2], out, { expectedDigest: digestOf(data) });
    assert.equal(dec.digest, digestOf(data));
    assert.equal(dec.size, data.length);
    assert.equal(dec.header.name, "disk.qcow2");
    assert.equal(dec.header.mtime, MTIME);
    assert.equal(dec.header.os, 255);
    await sh(`cmp '${src}' '${out}'`);
    assert.ok(await allocated(out) <= 4 * MiB + 1 * MiB + 64 * 1024, "4–8 MiB of zeros is a hole");

    // Multi-member (gzip.compress twice) and a header with FEXTRA, FNAME, FCOMMENT and FHCRC.
    const multi = join(dir, "multi.gz");
    await python(
      `import gzip, struct, sys, zlib
a, b = b"first member\\n" * 1000, b"second member\\n" * 1000
body = zlib.compressobj(6, zlib.DEFLATED, -15)
deflated = body.compress(b) + body.flush()
hdr = b"\\x1f\\x8b\\x08" + bytes([2 | 4 | 8 | 16]) + struct.pack("<I", 1234) + b"\\x00\\x03"
hdr += struct.pack("<H", 4) + b"XY\\x00\\x00" + "naïve.img".encode("latin-1") + b"\\x00" + b"a comment\\x00"
hdr += struct.pack("<H", zlib.crc32(hdr) & 0xffff)
second = hdr + deflated + struct.pack("<II", zlib.crc32(b), len(b))
open(sys.argv[1], "wb").write(gzip.compress(a, mtime=7) + second)
assert gzip.decompress(open(sys.argv[1], "rb").read()) == a + b`,
      multi,
    );
    const m = await decodeGzip([multi], join(dir, "multi.out"));
    const expected = "first member\n".repeat(1000) + "second member\n".repeat(1000);
    assert.equal(await Deno.readTextFile(join(dir, "multi.out")), expected);
    assert.equal(m.header.mtime, 7);
    assert.equal(m.header.name, undefined);
    // parseGzipHeader on the second member's header directly.
    const bytes = await Deno.readFile(multi);
    const second = bytes.subarray(bytes.indexOf(0x1f, 10));
    const h = parseGzipHeader(second.subarray(second.indexOf(0x1f)));
    assert.deepEqual(h, {
      flags: 30,
      mtime: 1234,
      xfl: 0,
      os: 3,
      name: "naïve.img",
      headerLength: 10 + 2 + 4 + 10 + 10 + 2,
    });
  });
});

Deno.test("gzip: malformed headers and corrupt streams are integrity errors; no output left", async () => {
  const good = new Uint8Array([0x1f, 0x8b, 8, 8, 1, 0, 0, 0, 0, 0xff, 0x61, 0]);
  assert.equal(parseGzipHeader(good).name, "a");
  for (const bad of [good.subarray(0, 11), good.subarray(0, 5), new Uint8Array(0)]) {
    assert.throws(() => parseGzipHeader(bad), isKind("integrity"), "truncated");
  }
  assert.throws(
    () => parseGzipHeader(new Uint8Array([0x50, 0x4b, 3, 4, 0, 0, 0, 0, 0, 0])),
    isKind("integrity"),
  );
  assert.throws(
    () => parseGzipHeader(new Uint8Array([0x1f, 0x8b, 7, 0, 0, 0, 0, 0, 0, 0])),
    isKind("integrity"),
  );
  assert.throws(
    () => parseGzipHeader(new Uint8Array([0x1f, 0x8b, 8, 0x20, 0, 0, 0, 0, 0, 0])),
    isKind("integrity"),
  );
  assert.throws(
    () => parseGzipHeader(new Uint8Array([0x1f, 0x8b, 8, 2, 0, 0, 0, 0, 0, 0, 0x12, 0x34])),
    isKind("integrity"),
    "FHCRC mismatch",
  );

  await withDir(async (dir) => {
    const src = join(dir, "src.img");
    const data = textBytes(3 * MiB);
    await Deno.writeFile(src, data);
    const enc = await encodeGzip(src, {
      storedName: "d.img",
      mtime: MTIME,
      chunkSize: 64 * 1024,
      outDir: dir,
    });
    const paths = enc.pieces.map((p) => p.path);
    assert.ok(paths.length >= 4, `${paths.length} pieces`);
    const out = join(dir, "out.img");
    // A missing middle piece, a flipped byte, a missing tail, a wrong expected digest, junk.
    const flipped = join(dir, "flipped");
    const b = await Deno.readFile(paths[0]);
    b[b.length >> 1] ^= 0xff;
    await Deno.writeFile(flipped, b);
    const notGzip = join(dir, "junk");
    await Deno.writeFile(notGzip, textBytes(100));
    const attempts: [string[], string | undefined][] = [
      [[paths[0], ...paths.slice(2)], undefined],
      [[flipped, ...paths.slice(1)], undefined],
      [paths.slice(0, -1), undefined],
      [paths, digestOf("something else")],
      [[notGzip], undefined],
    ];
    for (const [i, [pieces, expectedDigest]] of attempts.entries()) {
      await Deno.writeFile(out, new Uint8Array([1, 2, 3])); // stale output gets replaced, then removed
      await assert.rejects(
        decodeGzip(pieces, out, { expectedDigest }),
        isKind("integrity"),
        `attempt ${i}`,
      );
      await assert.rejects(Deno.stat(out), Deno.errors.NotFound, "no partial output");
    }
    await assert.rejects(decodeGzip([join(dir, "nope")], out), isKind("not-found"));
    const ok = await decodeGzip(paths, out, { expectedDigest: digestOf(data) });
    assert.equal(ok.size, data.length);

    // A gzip bomb: 64 MiB of zeros then 8 MiB of text is 72 MiB on disk… minus the zero
    // blocks, which stay holes. The cap counts what is written, so 8 MiB pass and 7 do not.
    const bomb = join(dir, "bomb.img");
    await makeFile(bomb, 72 * MiB, [[64 * MiB, textBytes(8 * MiB)]]);
    const bombEnc = await encodeGzip(bomb, {
      storedName: "b",
      mtime: 0,
      chunkSize: 0,
      outDir: dir,
    });
    const bombPieces = bombEnc.pieces.map((p) => p.path);
    assert.equal((await decodeGzip(bombPieces, out, { maxBytes: 8 * MiB })).size, 72 * MiB);
    await assert.rejects(
      decodeGzip(bombPieces, out, { maxBytes: 7 * MiB }),
      (e: unknown) => isKind("io")(e) && /free space/.test((e as Error).message),
    );
    await assert.rejects(Deno.stat(out), Deno.errors.NotFound, "no partial output");
  });
});

Deno.test("gzip: without pigz, gzip(1) is used with the same header swap", async () => {
  await withDir(async (dir) => {
    // A PATH with everything but pigz.
    const bin = join(dir, "bin");
    await Deno.mkdir(bin);
    for (const tool of ["gzip", "qemu-img", "zstd"]) {
      await Deno.symlink(await sh(`command -v ${tool}`), join(bin, tool));
    }
    const src = join(dir, "disk.raw");
    await makeFile(src, 5 * MiB, [[MiB, textBytes(2 * MiB)]]);
    const path = Deno.env.get("PATH")!;
    let enc;
    let dec;
    Deno.env.set("PATH", bin);
    try {
      await assert.rejects(sh("command -v pigz"));
      enc = await encodeGzip(src, {
        storedName: "disk.raw",
        mtime: MTIME,
        chunkSize: 0,
        outDir: dir,
      });
      dec = await decodeGzip([enc.pieces[0].path], join(dir, "out"), {
        expectedDigest: enc.fileDigest,
      });
    } finally {
      Deno.env.set("PATH", path);
    }
    assert.equal(dec.header.name, "disk.raw");
    const hex = enc.fileDigest.slice(7);
    assert.equal(await python(PY_READ, enc.pieces[0].path), `${hex} ${MTIME} disk.raw`);
    // Same header and trailer as with pigz; the deflate bytes may differ.
    const withPigz = await encodeGzip(src, {
      storedName: "disk.raw",
      mtime: MTIME,
      chunkSize: 0,
      outDir: dir,
    });
    const [a, b] = [
      await Deno.readFile(enc.pieces[0].path),
      await Deno.readFile(withPigz.pieces[0].path),
    ];
    assert.deepEqual(a.subarray(0, 19), b.subarray(0, 19));
    assert.deepEqual(a.subarray(-8), b.subarray(-8), "CRC32 and ISIZE");
  });
});
