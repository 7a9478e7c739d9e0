/**
 * The lazy file (lib/lazy/source.ts) over a real image: a raw disk exported by sarde in 1 MiB
 * chunks, pushed to a real registry (`docker-registry` on 127.0.0.1), and read back unit by unit
 * through proxies that count, corrupt or swap what the registry sends. Plus the unit list of
 * hostile manifests (`chunkUnits`).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { chunkUnits, type FileUnit, groupDiskLayers, type ImageFile } from "../lib/image/format.ts";
import { zeroDigest } from "../lib/image/zstd.ts";
import {
  decodeZstdUnit,
  type LazyFile,
  openLazyFile,
  PRESENCE_LOG_SUFFIX,
  registryUnitFetcher,
  type UnitFetcher,
} from "../lib/lazy/source.ts";
import { serveNbd } from "../lib/lazy/nbd.ts";
import { prefetchQcow2Metadata } from "../lib/lazy/qcow2_metadata.ts";
import { chunkGroups, registryTableReader, type TableReader } from "../lib/lazy/units.ts";
import { digestFile, digestOf } from "../lib/oci/digest.ts";
import type { Descriptor, Manifest } from "../lib/oci/types.ts";
import { createRegistryClient, type RegistryClient } from "../lib/registry/client.ts";
import { SardeError } from "../lib/util/errors.ts";
import * as api from "../mod.ts";
import { assertSameBytes } from "./support/bytes.ts";
import { run, tempDir } from "./support/images.ts";
import {
  type RunningProxy,
  startFaultyProxy,
  startForwarder,
  startRegistry,
  type TestRegistry,
} from "./support/registry.ts";
import { domainXml } from "./support/vms.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };
const MiB = 1 << 20;
const REPO = "lazy/disk";

/**
 * The disk: 6.5 MiB of random bytes but for MiB 2 (zeros: a zero chunk), so 7 units of 1 MiB,
 * the last one half full.
 */
function diskBytes(): Uint8Array {
  const data = new Uint8Array(6 * MiB + MiB / 2);
  for (let pos = 0; pos < data.length; pos += 65536) {
    crypto.getRandomValues(data.subarray(pos, Math.min(data.length, pos + 65536)));
  }
  data.fill(0, 2 * MiB, 3 * MiB);
  return data;
}

/** An exported and pushed image with one raw disk, and what a lazy reader needs of it. */
interface Fixture {
  reg: TestRegistry;
  work: string;
  data: Uint8Array;
  file: ImageFile;
  units: FileUnit[];
}

async function pushedDisk(
  data = diskBytes(),
  chunkSize = MiB,
  tag = "v1",
  format: "raw" | "qcow2" = "raw",
): Promise<Fixture> {
  const reg = await startRegistry("plain");
  const work = await tempDir("lazy-source");
  const vmDir = join(work, "vm");
  await Deno.mkdir(vmDir);
  const disk = join(vmDir, `disk.${format}`);
  await Deno.writeFile(disk, data);
  const xml = join(vmDir, "domain.xml");
  await Deno.writeTextFile(
    xml,
    domainXml({
      name: "lazy",
      disks: [{ path: disk, format }],
      osinfo: null,
    }),
  );
  const ocidir = join(work, "oci");
  const ref = `${reg.host}/${REPO}:${tag}`;
  await api.exportVm("lazy", ref, { ocidir, libvirtConfig: xml, chunkSize });
  await api.push(ref, { ocidir });
  const client = createRegistryClient(reg.host);
  try {
    const got = await client.getManifest(REPO, tag);
    const manifest = JSON.parse(new TextDecoder().decode(got.bytes)) as Manifest;
    const [file] = groupDiskLayers(manifest, "test image");
    return { reg, work, data, file, units: chunkUnits(file) };
  } finally {
    client.close();
  }
}

/** The GETs of blobs a proxy forwarded, by digest. */
function blobGets(proxy: RunningProxy): string[] {
  return proxy.requests().filter((r) => r.method === "GET" && r.path.includes("/blobs/sha256:"))
    .map((r) => r.path.slice(r.path.lastIndexOf("/") + 1));
}

/** The units listed in a presence log (entries are unit numbers + 1). */
async function logged(path: string): Promise<number[]> {
  const bytes = await Deno.readFile(path + PRESENCE_LOG_SUFFIX);
  const view = new DataView(bytes.buffer);
  const out: number[] = [];
  for (let pos = 0; pos + 4 <= bytes.length; pos += 4) {
    const entry = view.getUint32(pos, true); // unit + 1; 0 is no entry
    if (entry > 0) out.push(entry - 1);
  }
  return out.sort((a, b) => a - b);
}

/** A client on `host` and a fetcher through it; both closed by `using`. */
function fetcherVia(host: string): UnitFetcher & Disposable {
  const client: RegistryClient = createRegistryClient(host, {
    retry: { baseDelayMs: 20, maxElapsedMs: 5000 },
  });
  const fetchUnit = registryUnitFetcher(client, REPO);
  return Object.assign(fetchUnit, { [Symbol.dispose]: () => client.close() });
}

Deno.test({
  name: "lazy file over a pushed 1 MiB-chunk image",
  ...opts,
  fn: async (t) => {
    const fx = await pushedDisk();
    const { reg, work, data, file, units } = fx;
    const out = join(work, "out");
    await Deno.mkdir(out);
    const path = join(out, "disk.raw");
    const open = (fetchUnit: UnitFetcher): Promise<LazyFile> =>
      openLazyFile({ path, file, units, fetchUnit });
    const expect = (offset: number, length: number) => data.subarray(offset, offset + length);
    try {
      assert.equal(units.length, 7);
      assert.equal(units[2].digest, zeroDigest(MiB), "MiB 2 is a zero chunk");
      assert.equal(file.size, data.length);

      await t.step("reads equal the disk; only the touched units are fetched", async () => {
        await using counter = await startForwarder({ url: reg.url }, 0);
        using fetchUnit = fetcherVia(counter.host);
        await using lazy = await open(fetchUnit);
        assert.equal(lazy.size, data.length);
        assert.equal((await Deno.stat(path)).size, data.length, "created at its full size");
        assert.equal(lazy.presentBytes, MiB, "only the zero unit is present");
        assertSameBytes(await lazy.read(100, 4000), expect(100, 4000));
        // Across units 4 and 5, and the last byte of the file.
        assertSameBytes(await lazy.read(5 * MiB - 10, 20), expect(5 * MiB - 10, 20));
        assertSameBytes(await lazy.read(data.length - 1, 1), expect(data.length - 1, 1));
        // The zero unit needs no fetch.
        assertSameBytes(await lazy.read(2 * MiB + 5, 1000), expect(2 * MiB + 5, 1000));
        // Again from the file, without fetching.
        assertSameBytes(await lazy.read(200, 50), expect(200, 50));
        assert.deepEqual(
          blobGets(counter).sort(),
          [0, 4, 5, 6].map((i) => units[i].blob.digest).sort(),
        );
        assert.deepEqual(await logged(path), [0, 4, 5, 6]);
        assert.equal(lazy.presentBytes, 4 * MiB + MiB / 2);
        assert.equal(lazy.complete, false);
        await assert.rejects(lazy.read(data.length - 5, 10), /outside/);
      });

      await t.step("two concurrent reads of one unit fetch it once", async () => {
        await using counter = await startForwarder({ url: reg.url }, 0);
        using fetchUnit = fetcherVia(counter.host);
        await using lazy = await open(fetchUnit);
        const [a, b, c] = await Promise.all([
          lazy.read(MiB + 10, 100),
          lazy.read(MiB + 500_000, 70_000),
          lazy.read(MiB + 10, 100),
        ]);
        assertSameBytes(a, expect(MiB + 10, 100));
        assertSameBytes(b, expect(MiB + 500_000, 70_000));
        assertSameBytes(c, a);
        assert.deepEqual(blobGets(counter), [units[1].blob.digest]);
      });

      await t.step(
        "a corrupt unit fails the read, leaves no bytes, and is fetched later",
        async () => {
          const unit = units[3];
          await using corrupting = await startFaultyProxy({ url: reg.url }, {
            kind: "corrupt-blob",
            digests: [unit.blob.digest],
          });
          using bad = fetcherVia(corrupting.host);
          using good = fetcherVia(reg.host);
          let via: UnitFetcher = bad;
          await using lazy = await open((u, s) => via(u, s));
          const before = lazy.presentBytes;
          await assert.rejects(
            lazy.read(3 * MiB + 100, 100),
            (e) => e instanceof SardeError && e.kind === "integrity",
          );
          assert.equal(corrupting.faults(), 2, "fetched once more, then given up");
          assert.equal(lazy.presentBytes, before);
          assert.ok(!(await logged(path)).includes(3), "not logged");
          const onDisk = await Deno.readFile(path);
          assert.ok(onDisk.subarray(3 * MiB, 4 * MiB).every((b) => b === 0), "nothing written");

          // The same as a range (as frames will be fetched): not checked by the client, so the
          // decoder meets the corrupt bytes.
          via = (u, s) => bad({ ...u, range: { offset: 0, length: u.blob.size } }, s);
          await assert.rejects(lazy.read(3 * MiB, 10), /not a valid zstd frame/);
          assert.equal(corrupting.faults(), 4);
          assert.ok((await Deno.readFile(path)).subarray(3 * MiB, 4 * MiB).every((b) => b === 0));

          // A registry answering with another (valid) blob of the same length: decodes fine, but
          // to other bytes.
          via = (u, s) => good({ ...u, blob: units[0].blob }, s);
          await assert.rejects(lazy.read(3 * MiB, 10), /does not decode to/);
          assert.ok((await Deno.readFile(path)).subarray(3 * MiB, 4 * MiB).every((b) => b === 0));

          via = good; // the fault is gone
          assertSameBytes(await lazy.read(3 * MiB + 100, 100), expect(3 * MiB + 100, 100));
          assert.ok((await logged(path)).includes(3));
        },
      );

      await t.step(
        "reopened, even after a torn log entry, present units are not fetched",
        async () => {
          const present = await logged(path);
          assert.deepEqual(present, [0, 1, 3, 4, 5, 6]);
          // A crash in the middle of an append.
          using f = await Deno.open(path + PRESENCE_LOG_SUFFIX, { append: true });
          await f.write(new Uint8Array([9, 0]));
          await using counter = await startForwarder({ url: reg.url }, 0);
          using fetchUnit = fetcherVia(counter.host);
          {
            await using lazy = await open(fetchUnit);
            assert.equal(lazy.presentBytes, data.length, "every unit is present");
            for (const i of [0, 1, 2, 3, 4, 5, 6]) {
              const u = units[i];
              assertSameBytes(await lazy.read(u.offset, u.length), expect(u.offset, u.length));
            }
            assert.equal(lazy.complete, true);
          }
          assert.deepEqual(blobGets(counter), []);
          assert.equal((await Deno.stat(path + PRESENCE_LOG_SUFFIX)).size % 4, 0, "torn tail cut");
        },
      );

      await t.step("zero and torn entries list nothing and misalign nothing", async () => {
        // Forget units 0 and 5 (as if their entries had not reached the disk), with an entry of
        // zeros first (an append whose size reached the disk before its bytes) and a torn one
        // last, then reopen.
        const kept = (await logged(path)).filter((i) => i !== 0 && i !== 5);
        const log = new Uint8Array(4 + kept.length * 4 + 3);
        kept.forEach((u, k) => new DataView(log.buffer).setUint32(4 + k * 4, u + 1, true));
        log.set([1, 2, 3], 4 + kept.length * 4);
        await Deno.writeFile(path + PRESENCE_LOG_SUFFIX, log);
        await using counter = await startForwarder({ url: reg.url }, 0);
        using fetchUnit = fetcherVia(counter.host);
        {
          await using lazy = await open(fetchUnit);
          assert.equal(lazy.presentBytes, data.length - 2 * MiB);
          assertSameBytes(await lazy.read(5 * MiB, 10), expect(5 * MiB, 10));
          assertSameBytes(await lazy.read(0, 10), expect(0, 10));
        }
        assert.deepEqual(blobGets(counter), [units[5].blob.digest, units[0].blob.digest]);
        assert.deepEqual(await logged(path), [0, 1, 3, 4, 5, 6]);
      });

      await t.step("a file without its log starts over: zero units are zeros", async () => {
        const junk = new Uint8Array(data.length).fill(0x5a);
        await Deno.writeFile(path, junk);
        await Deno.remove(path + PRESENCE_LOG_SUFFIX);
        await using counter = await startForwarder({ url: reg.url }, 0);
        using fetchUnit = fetcherVia(counter.host);
        {
          await using lazy = await open(fetchUnit);
          assert.equal(lazy.presentBytes, MiB, "only the zero unit");
          assertSameBytes(await lazy.read(2 * MiB, MiB), expect(2 * MiB, MiB));
          assertSameBytes(await lazy.read(6 * MiB, 10), expect(6 * MiB, 10));
        }
        assert.deepEqual(blobGets(counter), [units[6].blob.digest]);
        // Another size: the same.
        await Deno.truncate(path, 100);
        await using lazy = await open(fetchUnit);
        assert.equal(lazy.presentBytes, MiB);
        assert.equal((await Deno.stat(path)).size, data.length);
      });

      await t.step("prefetch fills the rest: the file is the image's file", async () => {
        await Deno.remove(path);
        await using counter = await startForwarder({ url: reg.url }, 0);
        using fetchUnit = fetcherVia(counter.host);
        {
          await using lazy = await open(fetchUnit);
          assert.equal(lazy.presentBytes, MiB, "a new file: the old log does not count");
          assertSameBytes(await lazy.read(4 * MiB, 10), expect(4 * MiB, 10));
          await lazy.prefetch();
          assert.equal(lazy.complete, true);
          assert.equal(lazy.presentBytes, data.length);
          await lazy.prefetch(); // nothing left: returns at once
        }
        assert.equal(blobGets(counter).length, 6, "every unit but the zero one, once");
        assert.equal((await digestFile(path)).digest, file.digest);
        assert.deepEqual(await logged(path), [0, 1, 3, 4, 5, 6]);
      });

      await t.step(
        "a bulk fill goes after waiting reads, logs units once written, and they stay present",
        async () => {
          await Deno.remove(path);
          await using counter = await startForwarder({ url: reg.url }, 0);
          using fetchUnit = fetcherVia(counter.host);
          const gate = Promise.withResolvers<void>();
          let asked: number[] | undefined;
          let duringWrite: { present: number; logged: number[] } | undefined;
          {
            await using lazy = await open(async (u, s) => {
              await gate.promise;
              return await fetchUnit(u, s);
            });
            // Whatever fails below, the read is let go before the file closes (close waits).
            using _letGo = { [Symbol.dispose]: () => gate.resolve() };
            const reading = lazy.read(units[4].offset + 5, 10);
            // As the lazy server's background completion does: the bytes go into the file
            // through another descriptor (a codec worker's).
            const filling = lazy.fillWith([0, 1, 3, 4], async (missing) => {
              asked = missing;
              using f = await Deno.open(path, { write: true });
              for (const i of missing) {
                const bytes = expect(units[i].offset, units[i].length);
                await f.seek(units[i].offset, Deno.SeekMode.Start);
                for (let off = 0; off < bytes.length;) off += await f.write(bytes.subarray(off));
              }
              duringWrite = { present: lazy.presentBytes, logged: await logged(path) };
              return missing.filter((i) => i !== 1); // say unit 1 could not be had
            });
            await new Promise((r) => setTimeout(r, 300));
            assert.equal(asked, undefined, "the bulk fill started while a read waited");
            gate.resolve();
            assertSameBytes(await reading, expect(units[4].offset + 5, 10));
            await filling;
            assert.deepEqual(asked, [0, 1, 3], "present units are not asked for");
            assert.deepEqual(
              duringWrite,
              { present: 2 * MiB, logged: [4] },
              "units were present or logged before their bytes were written",
            );
            assert.equal(lazy.presentBytes, 4 * MiB);
            assert.deepEqual(await logged(path), [0, 3, 4]);
          }
          {
            await using lazy = await open(fetchUnit);
            assert.equal(lazy.presentBytes, 4 * MiB, "reopened: the bulk-filled units count");
            for (const i of [0, 1, 3]) {
              const u = units[i];
              assertSameBytes(await lazy.read(u.offset, u.length), expect(u.offset, u.length));
            }
          }
          assert.deepEqual(blobGets(counter), [units[4].blob.digest, units[1].blob.digest]);
        },
      );
    } finally {
      await reg.stop();
      await Deno.remove(work, { recursive: true });
    }
  },
});

/** Units of 1 MiB of `data`, each its own uncompressed "blob" (a local store: no registry). */
function localUnits(data: Uint8Array): FileUnit[] {
  const units: FileUnit[] = [];
  for (let offset = 0; offset < data.length; offset += MiB) {
    const length = Math.min(MiB, data.length - offset);
    const bytes = data.subarray(offset, offset + length);
    const blob: Descriptor = { mediaType: "x", digest: digestOf(bytes), size: length };
    units.push({ offset, length, blob, digest: digestOf(bytes) });
  }
  return units;
}

Deno.test({
  name: "lazy file: prefetch starts no fetch while a read waits for a unit",
  ...opts,
  fn: async () => {
    // No registry needed to watch the order: units of a local "blob" store, fetched on a signal.
    const data = diskBytes();
    const work = await tempDir("lazy-order");
    try {
      const units = localUnits(data);
      const file: ImageFile = { name: "d", encoding: "zstd", layers: [], size: data.length };
      const order: number[] = [];
      const gates = new Map<number, () => void>();
      const fetchUnit: UnitFetcher = async (u, signal) => {
        const i = units.indexOf(u);
        order.push(i);
        await new Promise<void>((go, stop) => {
          gates.set(i, go);
          signal?.addEventListener("abort", () => stop(signal.reason), { once: true });
        });
        return data.slice(u.offset, u.offset + u.length);
      };
      const open = (path: string) =>
        openLazyFile({
          path,
          file,
          units,
          fetchUnit,
          decode: (c) => Promise.resolve(c), // the "compression" of this store is none
          prefetchConcurrency: 1,
        });
      await using lazy = await open(join(work, "d"));
      const until = async (cond: () => boolean) => {
        while (!cond()) await new Promise((r) => setTimeout(r, 5));
      };
      const prefetching = lazy.prefetch();
      await until(() => order.length === 1); // unit 0, the prefetch's first
      const reading = lazy.read(5 * MiB, 10);
      await until(() => order.length === 2);
      gates.get(0)!(); // the prefetch's fetch ends while the read still waits
      await new Promise((r) => setTimeout(r, 100));
      assert.deepEqual(order, [0, 5], "no new prefetch fetch while the read waits");
      gates.get(5)!();
      assertSameBytes(await reading, data.subarray(5 * MiB, 5 * MiB + 10));
      await until(() => order.length === 3);
      assert.deepEqual(order, [0, 5, 1], "then the prefetch goes on");
      for (const i of [1, 3, 4, 6]) {
        await until(() => gates.has(i));
        gates.get(i)!();
      }
      await prefetching;
      assert.deepEqual(order, [0, 5, 1, 3, 4, 6], "unit 2 is zeros: never fetched");
      assert.equal((await digestFile(join(work, "d"))).digest, digestOf(data));

      // An aborted prefetch stops after the fetch in flight; closing ends a fetch that hangs.
      order.length = 0;
      gates.clear();
      const other = await open(join(work, "e"));
      const stop = new AbortController();
      const aborted = other.prefetch(stop.signal);
      await until(() => order.length === 1);
      stop.abort();
      gates.get(0)!();
      await assert.rejects(aborted);
      assert.deepEqual(order, [0]);
      assert.equal(other.presentBytes, 2 * MiB, "unit 0 and the zero unit");
      const hanging = other.read(MiB, 10);
      await until(() => order.length === 2);
      await other.close();
      await assert.rejects(hanging);
      await assert.rejects(other.read(0, 10), /closed/);
    } finally {
      await Deno.remove(work, { recursive: true });
    }
  },
});

Deno.test({
  name: "lazy file: fetched and decoded units are freed once used, the bytes given to fill are not",
  ...opts,
  fn: async () => {
    const data = diskBytes();
    const work = await tempDir("lazy-free");
    try {
      const units = localUnits(data);
      const fetched: Uint8Array[] = [];
      const decoded: Uint8Array[] = [];
      await using lazy = await openLazyFile({
        path: join(work, "d"),
        file: { name: "d", encoding: "zstd", layers: [], size: data.length },
        units,
        fetchUnit: (u) => {
          fetched.push(data.slice(u.offset, u.offset + u.length));
          return Promise.resolve(fetched.at(-1)!);
        },
        // the "compression" of this store is none; unit 1 is decoded in place
        decode: (c, u) => {
          decoded.push(u.offset === MiB ? c : c.slice());
          return Promise.resolve(decoded.at(-1)!);
        },
      });
      assertSameBytes(await lazy.read(MiB - 10, 20), data.subarray(MiB - 10, MiB + 10));
      assert.equal(decoded.length, 2, "units 0 and 1");
      assert.deepEqual(decoded.map((d) => d.byteLength), [0, 0], "freed once written");
      assert.deepEqual(fetched.map((d) => d.byteLength), [0, 0], "freed once decoded");
      const given = data.slice(5 * MiB, 6 * MiB);
      assert.ok(await lazy.fill(5, given));
      assert.equal(given.byteLength, MiB, "the caller's bytes are left alone");
      await lazy.prefetch();
      assert.ok([...fetched, ...decoded].every((d) => d.byteLength === 0));
      assert.equal((await digestFile(join(work, "d"))).digest, digestOf(data));
    } finally {
      await Deno.remove(work, { recursive: true });
    }
  },
});

/**
 * 13 MiB in 4 MiB chunks of 2 MiB frames: random but for MiB 2–4 (a zero frame in a framed chunk)
 * and 8–12 (a zero chunk: no table, one unit). Units: 0 1 | 2 3 | 4 | 5.
 */
function framedDiskBytes(): Uint8Array {
  const data = new Uint8Array(13 * MiB);
  for (let pos = 0; pos < data.length; pos += 65536) {
    crypto.getRandomValues(data.subarray(pos, pos + 65536));
  }
  data.fill(0, 2 * MiB, 4 * MiB);
  data.fill(0, 8 * MiB, 12 * MiB);
  return data;
}

Deno.test({
  name: "lazy file of framed chunks: a chunk's table is read on its first touch, once",
  ...opts,
  async fn() {
    const fx = await pushedDisk(framedDiskBytes(), 4 * MiB, "framed");
    const { data } = fx;
    try {
      using fetcher = fetcherVia(fx.reg.host);
      const client = createRegistryClient(fx.reg.host);
      const tables: string[] = [];
      const fromRegistry = registryTableReader(client, REPO);
      const readTable: TableReader = (blob, where, signal) => {
        tables.push(blob.digest);
        return fromRegistry(blob, where, signal);
      };
      const fetched: FileUnit[] = [];
      const fetchUnit: UnitFetcher = (unit, signal) => {
        fetched.push(unit);
        return fetcher(unit, signal);
      };
      const path = join(fx.work, "framed.raw");
      const open = () =>
        openLazyFile({ path, file: fx.file, groups: chunkGroups(fx.file, readTable), fetchUnit });
      const expect = async (lf: LazyFile, at: number, length: number) =>
        assertSameBytes(await lf.read(at, length), data.subarray(at, at + length), `bytes ${at}`);
      try {
        let lf = await open();
        assert.equal(tables.length, 0, "a table was read before any touch");
        assert.equal(lf.presentBytes, 4 * MiB, "the zero chunk is present from the start");

        // Both frames of chunk 0 touched at once: one table read, and the zero frame is not
        // fetched.
        await Promise.all([expect(lf, 100, 4096), expect(lf, 2 * MiB + 5, 4096)]);
        assert.deepEqual(tables, [fx.file.layers[0].digest]);
        assert.equal(fetched.length, 1);
        assert.ok(fetched[0].range, "a frame is a ranged read");
        assert.deepEqual(await logged(path), [0]);
        assert.equal(lf.presentBytes, 8 * MiB);

        await expect(lf, 7 * MiB, 4096); // chunk 1's second frame: unit 3
        assert.deepEqual(tables, [fx.file.layers[0].digest, fx.file.layers[1].digest]);
        assert.deepEqual(await logged(path), [0, 3]);
        await lf.close();

        // Reopened: the log numbers the same units before any table is read.
        tables.length = 0;
        fetched.length = 0;
        lf = await open();
        assert.equal(lf.presentBytes, 4 * MiB + 2 * MiB + 2 * MiB, "0, 3 and the zero chunk");
        await expect(lf, 7 * MiB, 4096);
        await expect(lf, 0, 4 * MiB);
        assert.equal(fetched.length, 0, "a present unit was fetched again");

        await lf.prefetch();
        assert.ok(lf.complete);
        assertSameBytes(await Deno.readFile(path), data, "the prefetched file");
        assert.deepEqual(fetched.map((u) => u.offset / MiB), [4, 12], "units 2 and 5 only");
        assert.equal(new Set(tables).size, tables.length, "a table was read twice");
        await lf.close();
      } finally {
        client.close();
      }
    } finally {
      await fx.reg.stop();
      await Deno.remove(fx.work, { recursive: true });
    }
  },
});

Deno.test({
  name: "qcow2 metadata first: after it, QEMU opens and maps the lazy qcow2 without a fetch",
  ...opts,
  async fn() {
    // 8 MiB written at 0, 1 GiB and 2 GiB of a 3 GiB disk: three L2 tables, spread through the
    // file between the data clusters (4 MiB chunks of 2 MiB frames).
    const src = await tempDir("lazy-qcow2");
    const made = join(src, "made.qcow2");
    await run("qemu-img", ["create", "-q", "-f", "qcow2", made, "3G"], { check: true });
    const writes = [0, 1024, 2048].flatMap((m) => ["-c", `write -q -P ${m % 251 + 1} ${m}M 8M`]);
    await run("qemu-io", ["-f", "qcow2", ...writes, made], { check: true });
    const fx = await pushedDisk(await Deno.readFile(made), 4 * MiB, "qcow2", "qcow2");
    await Deno.remove(src, { recursive: true });
    try {
      using fetcher = fetcherVia(fx.reg.host);
      const client = createRegistryClient(fx.reg.host);
      let refuse = false;
      let fetches = 0;
      const fetchUnit: UnitFetcher = (unit, signal) => {
        if (refuse) return Promise.reject(new SardeError("network", "no more fetches"));
        fetches++;
        return fetcher(unit, signal);
      };
      const groups = () => chunkGroups(fx.file, registryTableReader(client, REPO));
      const socketPath = join(fx.work, "nbd", "nbd.sock");
      const map = async (lf: LazyFile) => {
        await using _server = await serveNbd({
          socketPath,
          exports: { "disk.qcow2": lf },
          socketOwner: null,
        });
        return await run("qemu-img", [
          "map",
          "--output=json",
          "-f",
          "qcow2",
          `nbd+unix:///disk.qcow2?socket=${socketPath}`,
        ]);
      };
      try {
        // Without the metadata, QEMU cannot even open it (the control: the check below can fail).
        refuse = true;
        {
          await using cold = await openLazyFile({
            path: join(fx.work, "cold.qcow2"),
            file: fx.file,
            groups: groups(),
            fetchUnit,
          });
          assert.notEqual((await map(cold)).code, 0, "qemu-img map read nothing of the file");
        }
        refuse = false;
        const path = join(fx.work, "disk.qcow2");
        await using lf = await openLazyFile({ path, file: fx.file, groups: groups(), fetchUnit });
        const ranges = await prefetchQcow2Metadata(lf);
        // header cluster, L1, refcount table, three L2 tables
        assert.equal(ranges.length, 1 + 1 + 1 + 1 + 3, JSON.stringify(ranges));
        const units = fx.file.size! / (2 * MiB);
        assert.ok(fetches >= 3 && fetches < units / 2, `${fetches} of ${units} frames fetched`);
        refuse = true;
        const mapped = await map(lf);
        assert.equal(mapped.code, 0, mapped.stderr);
        const data = (JSON.parse(mapped.stdout) as { start: number; data: boolean }[])
          .filter((e) => e.data).map((e) => e.start / MiB);
        assert.deepEqual(data, [0, 1024, 2048]);
      } finally {
        client.close();
      }
    } finally {
      await fx.reg.stop();
      await Deno.remove(fx.work, { recursive: true });
    }
  },
});

Deno.test("decodeZstdUnit: a frame that decodes to more than its unit is refused", async () => {
  const zeros = new Uint8Array(4 * MiB);
  const z = await new Deno.Command("zstd", { args: ["-c", "-q"], stdin: "piped", stdout: "piped" })
    .spawn();
  const writer = z.stdin.getWriter();
  const fed = writer.write(zeros).then(() => writer.close()); // zstd's output is read meanwhile
  const frame = (await z.output()).stdout;
  await fed;
  const unit = (length: number): FileUnit => ({
    offset: 0,
    length,
    blob: { mediaType: "x", digest: digestOf(frame), size: frame.length },
    digest: digestOf(zeros),
  });
  assertSameBytes(await decodeZstdUnit(frame, unit(zeros.length)), zeros);
  await assert.rejects(
    decodeZstdUnit(frame, unit(1000)),
    (e) => e instanceof SardeError && e.kind === "integrity" && /more than 1000/.test(e.message),
  );
  await assert.rejects(
    decodeZstdUnit(frame.subarray(0, frame.length - 3), unit(zeros.length)),
    (e) => e instanceof SardeError && e.kind === "integrity" && /not a valid zstd/.test(e.message),
  );
});

/** A zstd file of `sizes` chunks with valid annotations, for `chunkUnits`. */
function chunkedFile(sizes: number[]): ImageFile {
  let offset = 0;
  const layers = sizes.map((size, index) => {
    const layer: Descriptor = {
      mediaType: "application/octet-stream+zstd",
      digest: digestOf(`blob ${index}`),
      size: 100,
      annotations: {
        "org.sardinecake.chunk.index": String(index),
        "org.sardinecake.chunk.offset": String(offset),
        "org.sardinecake.chunk.size": String(size),
        "org.sardinecake.chunk.digest": digestOf(`chunk ${index}`),
      },
    };
    offset += size;
    return layer;
  });
  return { name: "d", encoding: "zstd", layers, size: offset };
}

Deno.test("chunkUnits: one unit per chunk; hostile annotations are refused", () => {
  const good = chunkedFile([MiB, MiB, 1000]);
  assert.deepEqual(
    chunkUnits(good).map((u) => [u.offset, u.length, u.digest, u.blob.digest, u.range]),
    good.layers.map((l) => [
      Number(l.annotations!["org.sardinecake.chunk.offset"]),
      Number(l.annotations!["org.sardinecake.chunk.size"]),
      l.annotations!["org.sardinecake.chunk.digest"],
      l.digest,
      undefined,
    ]),
  );
  const refused = (change: (f: ImageFile) => void, why: RegExp) => {
    const f = chunkedFile([MiB, MiB, 1000]);
    change(f);
    assert.throws(
      () => chunkUnits(f),
      (e) => e instanceof SardeError && e.kind === "integrity" && why.test(e.message),
    );
  };
  const set = (f: ImageFile, i: number, key: string, value: string) =>
    f.layers[i].annotations![`org.sardinecake.chunk.${key}`] = value;
  refused((f) => set(f, 1, "offset", String(MiB - 1)), /overlap/);
  refused((f) => set(f, 1, "offset", String(MiB + 1)), /gap/);
  refused((f) => set(f, 2, "offset", "x"), /not a whole number/);
  refused((f) => set(f, 1, "index", "2"), /out of order/);
  refused((f) => set(f, 2, "digest", "sha256:nothex"), /chunk digest/);
  refused((f) => f.size = 3 * MiB, /cover/);
  refused((f) => f.size = MiB, /beyond/);
  refused((f) => set(f, 1, "size", "0"), /empty/);
  refused((f) => f.layers[2].size = 2 * MiB, /larger than zstd makes/);
  refused((f) => f.layers[0].size = -1, /invalid digest or size/);
  refused((f) => f.layers.pop(), /cover/);
  assert.throws(
    () => chunkUnits({ name: "d.qcow2", encoding: "gzip", layers: [] }),
    (e) => e instanceof SardeError && e.kind === "usage" && /cannot be read lazily/.test(e.message),
  );
});
