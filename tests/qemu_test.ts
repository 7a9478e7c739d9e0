/**
 * lib/vm/qemu.ts against the real qemu-img 7.2 with images built by tests/support/vms.ts.
 */
import assert from "node:assert/strict";
import { basename, dirname, join } from "node:path";
import { SardeError } from "../lib/util/errors.ts";
import {
  backingChain,
  check,
  compare,
  createOverlay,
  info,
  looksLikeProtocol,
  map,
  qemuImgVersion,
  rebaseUnsafe,
} from "../lib/vm/qemu.ts";
import {
  CHAIN_WRITES,
  createAbsoluteChain,
  createIso,
  createPlainQcow2,
  createSparseRaw,
  hasPattern,
  makeVmDir,
  removeVmDir,
  sh,
  type TestChain,
} from "./support/vms.ts";

const MiB = 1024 * 1024;

function isKind(kind: string) {
  return (e: unknown) => e instanceof SardeError && e.kind === kind;
}

/** Runs `fn` with a fresh test directory, removed afterwards. */
async function inDir(prefix: string, fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await makeVmDir(prefix);
  try {
    await fn(dir);
  } finally {
    await removeVmDir(dir);
  }
}

/** Pokes bytes into a file at an offset (to damage qcow2 metadata on purpose). */
async function poke(path: string, offset: number, bytes: Uint8Array): Promise<void> {
  using f = await Deno.open(path, { read: true, write: true });
  await f.seek(offset, Deno.SeekMode.Start);
  await f.write(bytes);
}

/** The offset of a qcow2 image's first refcount block (header → refcount table → entry 0). */
async function firstRefcountBlock(path: string): Promise<number> {
  using f = await Deno.open(path, { read: true });
  const header = new Uint8Array(72);
  await f.read(header);
  const table = Number(new DataView(header.buffer).getBigUint64(48));
  await f.seek(table, Deno.SeekMode.Start);
  const entry = new Uint8Array(8);
  await f.read(entry);
  return Number(new DataView(entry.buffer).getBigUint64(0));
}

/** Copies a chain's files into one folder under new names (base first). */
async function copyFlat(chain: TestChain, dir: string, names: string[]): Promise<string[]> {
  await Deno.mkdir(dir, { recursive: true });
  const files = names.map((n) => join(dir, n));
  await Deno.copyFile(chain.base.path, files[0]);
  await Deno.copyFile(chain.mid.path, files[1]);
  await Deno.copyFile(chain.top.path, files[2]);
  return files;
}

Deno.test("qemuImgVersion: parses qemu-img --version", async () => {
  const v = await qemuImgVersion();
  assert.ok(v.major >= 7, v.text);
  assert.match(v.text, /^qemu-img version \d+\.\d+/);
});

Deno.test("looksLikeProtocol: colon before the first slash", () => {
  assert.equal(looksLikeProtocol("sha256:abc.qcow2"), true);
  assert.equal(looksLikeProtocol("nbd://host/x"), true);
  assert.equal(looksLikeProtocol("./sha256:abc.qcow2"), false);
  assert.equal(looksLikeProtocol("/var/lib/sha256:abc/disk.qcow2"), false);
  assert.equal(looksLikeProtocol("disk.qcow2"), false);
});

Deno.test("backingChain: 3-level chain with absolute references in different folders", async () => {
  await inDir("chain", async (dir) => {
    const chain = await createAbsoluteChain(dir);
    const els = await backingChain(chain.top.path);
    assert.equal(els.length, 3);
    // top first
    assert.deepEqual(els.map((e) => e.filename), chain.topFirst.map((d) => d.path));
    assert.deepEqual(els.map((e) => basename(e.filename)), [
      "top.qcow2",
      "mid.qcow2",
      "base.qcow2",
    ]);
    assert.deepEqual(els.map((e) => basename(dirname(e.filename))), ["top", "mid", "base"]);
    assert.deepEqual(els.map((e) => e.format), ["qcow2", "qcow2", "qcow2"]);
    for (const e of els) {
      assert.equal(e.virtualSize, 4 * MiB);
      assert.ok((e.actualSize ?? 0) > 0);
      assert.equal(e.clusterSize, 65536);
      assert.equal(e.dirty, false);
      assert.equal(e.realFilename, e.filename);
    }
    // as written in the headers: absolute paths
    assert.equal(els[0].backingFilename, chain.mid.path);
    assert.equal(els[0].fullBackingFilename, chain.mid.path);
    assert.equal(els[0].backingFormat, "qcow2");
    assert.equal(els[1].backingFilename, chain.base.path);
    assert.equal(els[1].fullBackingFilename, chain.base.path);
    assert.equal(els[2].backingFilename, undefined);
    assert.equal(els[2].fullBackingFilename, undefined);
    assert.equal(els[2].backingFormat, undefined);
    // and the content is what the support module says it is
    assert.equal(await compare(chain.top.path, chain.expectedRaw, { formatB: "raw" }), true);
    for (const w of CHAIN_WRITES.flat().slice(-1)) {
      assert.equal(await hasPattern(chain.top.path, "qcow2", w), true);
    }
  });
});

Deno.test("backingChain: same basename in three folders (sardinecake 0.4's export bug)", async () => {
  await inDir("samebase", async (dir) => {
    const chain = await createAbsoluteChain(dir, { sameBasename: true });
    const els = await backingChain(chain.top.path, { format: "qcow2" });
    assert.deepEqual(els.map((e) => basename(e.filename)), [
      "disk.qcow2",
      "disk.qcow2",
      "disk.qcow2",
    ]);
    assert.equal(new Set(els.map((e) => e.realFilename)).size, 3, "three distinct files");
    assert.deepEqual(els.map((e) => e.filename), chain.topFirst.map((d) => d.path));
  });
});

Deno.test("backingChain: relative references are resolved and normalised, cwd-independent", async () => {
  await inDir("relchain", async (dir) => {
    await Deno.mkdir(join(dir, "a"));
    await Deno.mkdir(join(dir, "b"));
    await sh("qemu-img", ["create", "-q", "-f", "qcow2", join(dir, "a", "base.qcow2"), "1M"]);
    await sh("qemu-img", [
      "create",
      "-q",
      "-f",
      "qcow2",
      "-F",
      "qcow2",
      "-b",
      "../a/base.qcow2",
      join(dir, "b", "top.qcow2"),
    ]);
    const els = await backingChain(join(dir, "b", "top.qcow2"));
    assert.equal(els[0].backingFilename, "../a/base.qcow2");
    assert.equal(els[0].fullBackingFilename, join(dir, "a", "base.qcow2"));
    assert.equal(els[1].filename, join(dir, "a", "base.qcow2")); // not …/b/../a/…
    // a relative argument is resolved against the cwd
    const cwd = Deno.cwd();
    Deno.chdir(dir);
    try {
      const rel = await backingChain("b/top.qcow2");
      assert.equal(rel[0].filename, join(dir, "b", "top.qcow2"));
    } finally {
      Deno.chdir(cwd);
    }
  });
});

Deno.test("backingChain: raw, ISO and a plain qcow2 are single elements", async () => {
  await inDir("single", async (dir) => {
    const raw = await createSparseRaw(dir);
    const iso = await createIso(dir);
    const plain = await createPlainQcow2(dir);
    const r = await backingChain(raw.path, { format: "raw" });
    assert.equal(r.length, 1);
    assert.equal(r[0].format, "raw");
    assert.equal(r[0].virtualSize, 64 * MiB);
    assert.ok((r[0].actualSize ?? Infinity) < 4 * MiB, "sparse");
    const i = await backingChain(iso.path);
    assert.equal(i.length, 1);
    assert.equal(i[0].format, "raw");
    assert.equal(i[0].virtualSize, iso.virtualSize);
    const p = await backingChain(plain.path);
    assert.equal(p.length, 1);
    assert.equal(p[0].format, "qcow2");
    assert.equal(p[0].backingFilename, undefined);
  });
});

Deno.test("backingChain/info: paths containing ':' (image-ID folders) work", async () => {
  await inDir("colon", async (dir) => {
    const sub = join(dir, "sha256:0123abcd");
    await Deno.mkdir(sub);
    const plain = await createPlainQcow2(sub, { name: "x:y.qcow2" });
    const els = await backingChain(plain.path);
    assert.equal(els[0].filename, plain.path);
    assert.equal((await info(plain.path)).format, "qcow2");
    // relative to the cwd: still fine, we pass absolute paths to qemu-img
    const cwd = Deno.cwd();
    Deno.chdir(sub);
    try {
      assert.equal((await backingChain("x:y.qcow2"))[0].filename, plain.path);
    } finally {
      Deno.chdir(cwd);
    }
  });
});

Deno.test("backingChain: missing file or missing backing file → not-found", async () => {
  await inDir("missing", async (dir) => {
    await assert.rejects(backingChain(join(dir, "nope.qcow2")), isKind("not-found"));
    const chain = await createAbsoluteChain(dir);
    await Deno.remove(chain.base.path);
    await assert.rejects(backingChain(chain.top.path), (e: unknown) => {
      assert.ok(e instanceof SardeError);
      assert.equal(e.kind, "not-found");
      assert.match(e.message, /No such file or directory/);
      assert.ok(!e.message.includes("\n"), "one line");
      return true;
    });
  });
});

Deno.test("info: one image, backing file not opened", async () => {
  await inDir("info", async (dir) => {
    const chain = await createAbsoluteChain(dir);
    await Deno.remove(chain.base.path); // info without --backing-chain does not need it
    const i = await info(chain.mid.path);
    assert.equal(i.filename, chain.mid.path);
    assert.equal(i.backingFilename, chain.base.path);
    assert.equal(i.backingFormat, "qcow2");
  });
});

for (const sameBasename of [false, true]) {
  Deno.test(
    `rebaseUnsafe: absolute chain → relative chain in one folder (sameBasename=${sameBasename})`,
    async () => {
      await inDir("rebase", async (dir) => {
        const chain = await createAbsoluteChain(dir, { sameBasename });
        const names = ["disk-0.qcow2", "disk-1.qcow2", "disk-2.qcow2"];
        const [base, mid, top] = await copyFlat(chain, join(dir, "flat"), names);
        // copies still point at the originals
        assert.equal((await info(top)).backingFilename, chain.mid.path);
        await rebaseUnsafe(mid, names[0], "qcow2");
        await rebaseUnsafe(top, names[1], "qcow2");
        const els = await backingChain(top);
        assert.deepEqual(els.map((e) => e.filename), [top, mid, base]);
        assert.deepEqual(els.map((e) => e.backingFilename), [names[1], names[0], undefined]);
        for (const f of [base, mid, top]) {
          const c = await check(f);
          assert.equal(c.supported, true);
          assert.equal(c.ok, true, f);
          assert.equal(c.corruptions + c.leaks + c.checkErrors, 0);
        }
        assert.equal(await compare(top, chain.top.path), true);
        assert.equal(await compare(top, chain.expectedRaw, { formatB: "raw" }), true);
        // the originals can go, and the folder can move as a whole
        await Deno.remove(join(dir, "base"), { recursive: true });
        await Deno.rename(join(dir, "flat"), join(dir, "moved"));
        const moved = await backingChain(join(dir, "moved", names[2]));
        assert.deepEqual(moved.map((e) => basename(dirname(e.filename))), [
          "moved",
          "moved",
          "moved",
        ]);
        assert.equal(
          await compare(join(dir, "moved", names[2]), chain.expectedRaw, { formatB: "raw" }),
          true,
        );
      });
    },
  );
}

Deno.test("rebaseUnsafe: refuses protocol-looking names, './name' works", async () => {
  await inDir("rebase-colon", async (dir) => {
    const base = await createPlainQcow2(dir, { name: "sha256:base.qcow2" });
    await sh("qemu-img", ["create", "-q", "-f", "qcow2", join(dir, "top.qcow2"), "4M"]);
    await assert.rejects(
      rebaseUnsafe(join(dir, "top.qcow2"), "sha256:base.qcow2", "qcow2"),
      (e: unknown) => e instanceof SardeError && e.kind === "usage" && /\.\/sha256/.test(e.hint!),
    );
    await rebaseUnsafe(join(dir, "top.qcow2"), "./sha256:base.qcow2", "qcow2");
    const els = await backingChain(join(dir, "top.qcow2"));
    assert.equal(els.length, 2);
    assert.equal(els[1].filename, base.path);
    assert.equal(await compare(join(dir, "top.qcow2"), base.path), true);
    await assert.rejects(rebaseUnsafe(join(dir, "top.qcow2"), "", "qcow2"), isKind("usage"));
    await assert.rejects(rebaseUnsafe(join(dir, "nope"), "x.qcow2", "qcow2"), isKind("not-found"));
  });
});

Deno.test("createOverlay: exclusive, content equals base, removed again on failure", async () => {
  await inDir("overlay", async (dir) => {
    const chain = await createAbsoluteChain(dir);
    const clone = join(dir, "clone.qcow2");
    await createOverlay(clone, chain.top.path, "qcow2");
    const els = await backingChain(clone);
    assert.equal(els.length, 4);
    assert.equal(els[0].backingFilename, chain.top.path);
    assert.equal(els[0].virtualSize, 4 * MiB);
    assert.equal(await compare(clone, chain.expectedRaw, { formatB: "raw" }), true);
    // never overwrites
    const before = await Deno.readFile(clone);
    await assert.rejects(createOverlay(clone, chain.top.path, "qcow2"), isKind("usage"));
    assert.deepEqual(await Deno.readFile(clone), before);
    // a relative base is relative to the overlay's folder
    await createOverlay(join(dir, "top", "sibling.qcow2"), "top.qcow2", "qcow2");
    assert.equal(
      (await backingChain(join(dir, "top", "sibling.qcow2")))[1].filename,
      chain.top.path,
    );
    // a missing base: error, and no file left behind
    const bad = join(dir, "bad.qcow2");
    await assert.rejects(createOverlay(bad, join(dir, "nope.qcow2"), "qcow2"), isKind("not-found"));
    await assert.rejects(Deno.stat(bad), Deno.errors.NotFound);
    // qemu-img's own error: one line, with its last stderr line; no file left behind
    await assert.rejects(createOverlay(bad, chain.top.path, "nosuchfmt"), (e: unknown) => {
      assert.ok(e instanceof SardeError && e.kind === "external", String(e));
      assert.match(e.message, /Unknown driver 'nosuchfmt'.*Could not open backing image/);
      assert.ok(!e.message.includes("\n"));
      return true;
    });
    await assert.rejects(Deno.stat(bad), Deno.errors.NotFound);
  });
});

Deno.test("check: clean, corrupted, leaking, unsupported", async () => {
  await inDir("check", async (dir) => {
    const good = await createPlainQcow2(dir, { name: "good.qcow2" });
    assert.deepEqual(
      { ...(await check(good.path)), report: undefined },
      { supported: true, ok: true, corruptions: 0, leaks: 0, checkErrors: 0, report: undefined },
    );
    // zero the first refcount block: every used cluster then has refcount 0 → corruptions
    const bad = await createPlainQcow2(dir, { name: "bad.qcow2" });
    await poke(bad.path, await firstRefcountBlock(bad.path), new Uint8Array(65536));
    const c = await check(bad.path);
    assert.equal(c.ok, false);
    assert.ok(c.corruptions > 0);
    // one more cluster at the end of the file with refcount 1 but no user → a leak only: still ok
    const leaky = await createPlainQcow2(dir, { name: "leaky.qcow2" });
    const { size } = await Deno.stat(leaky.path);
    const cluster = Math.ceil(size / 65536);
    await Deno.truncate(leaky.path, (cluster + 1) * 65536);
    await poke(
      leaky.path,
      (await firstRefcountBlock(leaky.path)) + 2 * cluster,
      new Uint8Array([0, 1]),
    );
    const l = await check(leaky.path);
    assert.equal(l.leaks, 1);
    assert.equal(l.corruptions, 0);
    assert.equal(l.ok, true);
    const raw = await createSparseRaw(dir);
    const r = await check(raw.path, { format: "raw" });
    assert.equal(r.supported, false);
    assert.equal(r.ok, true);
    await assert.rejects(check(join(dir, "nope.qcow2")), isKind("not-found"));
  });
});

Deno.test("compare: equal, different, sizes, missing", async () => {
  await inDir("compare", async (dir) => {
    const a = await createPlainQcow2(dir, { name: "a.qcow2" });
    const b = await createPlainQcow2(dir, { name: "b.qcow2" });
    const c = await createPlainQcow2(dir, {
      name: "c.qcow2",
      writes: [{ pattern: 0xa5, offset: 0, length: MiB }],
    });
    assert.equal(await compare(a.path, b.path), true);
    assert.equal(await compare(a.path, c.path), false);
    // raw copy of a
    const raw = join(dir, "a.raw");
    await sh("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", a.path, raw]);
    assert.equal(await compare(a.path, raw, { formatA: "qcow2", formatB: "raw" }), true);
    // a bigger image whose extra part is zeros: equal, unless strict
    const big = await createPlainQcow2(dir, { name: "big.qcow2", size: 8 * MiB, writes: a.writes });
    assert.equal(await compare(a.path, big.path), true);
    assert.equal(await compare(a.path, big.path, { strict: true }), false);
    await assert.rejects(compare(a.path, join(dir, "nope")), isKind("not-found"));
  });
});

Deno.test("map: sparse raw holes and data; chain depths", async () => {
  await inDir("map", async (dir) => {
    const raw = await createSparseRaw(dir);
    const ext = await map(raw.path, "raw");
    assert.equal(ext.reduce((n, e) => n + e.length, 0), 64 * MiB);
    const data = ext.filter((e) => e.data);
    const covered = (off: number) => data.some((e) => e.start <= off && off < e.start + e.length);
    assert.ok(covered(MiB) && covered(40 * MiB));
    assert.ok(!covered(20 * MiB) && !covered(63 * MiB));
    const dataBytes = data.reduce((n, e) => n + e.length, 0);
    assert.ok(dataBytes >= 192 * 1024 && dataBytes < 4 * MiB, String(dataBytes));
    for (const e of ext.filter((e) => !e.data)) assert.equal(e.zero, true);

    const chain = await createAbsoluteChain(dir);
    const cm = await map(chain.top.path, "qcow2");
    const at = (off: number) => cm.find((e) => e.start <= off && off < e.start + e.length)!;
    assert.equal(at(0).depth, 2); // base wrote 0..1M, mid overwrote from 512K
    assert.equal(at(0).data, true);
    assert.equal(at(MiB).depth, 1);
    assert.equal(at(2 * MiB).depth, 2);
    assert.equal(at(3 * MiB).depth, 0);
    assert.equal(at(3.75 * MiB).data, false);
    assert.equal(at(3.75 * MiB).zero, true);
    assert.equal(at(3.75 * MiB).present, false);
    await assert.rejects(map(join(dir, "nope")), isKind("not-found"));
  });
});
