/**
 * The lazy file (docs/lazy-pull.md, part 3): an image file that can be read before it has been
 * downloaded. A read maps to the file's units ({@link FileUnit}); a unit that is not present yet
 * is fetched, decoded, verified, written into the final sparse file, made durable and recorded in
 * a presence log, and then read from the file like any present one. Units may come in groups
 * ({@link UnitGroup}) whose layout is known only on their first touch (a framed chunk, whose frame
 * table is read then); a group's unit count is fixed up front, so unit numbers never change.
 *
 * Trust: the unit list comes from the manifest (whose digest the reference or the image ID pins),
 * so a unit's `digest` is trusted and its bytes are not until they hash to it. Bytes that do not
 * are neither written nor returned: a unit that fails verification is fetched once more (a
 * registry or proxy hiccup), then the read fails. The presence log lists only units whose
 * verified bytes were synced to disk before the entry was appended, so listed units are trusted
 * on the next open without reading them again; an entry lost in a crash only costs a refetch.
 *
 * The presence log `<path>.sarde-present` is append-only: 4-byte little-endian entries, each a
 * unit number plus one. The `+ 1` makes an entry of zeros invalid: after a power loss, some file
 * systems can show an append whose size reached the disk before its bytes as zeros, which must
 * not read as "unit 0 is present". A torn last entry (a crash mid-append) is ignored and cut off.
 * The log belongs to the file: a file that is missing, has another size, or has no usable log
 * (missing, empty, or listing units the file does not have) starts over, emptied to zeros, with
 * an empty log; so a zero unit always reads as zeros without being fetched. The path must be
 * specific to one image (the lazy server keeps its files per image ID), since the log cannot
 * tell one unit list from another of the same length.
 *
 * @module
 */

import { open } from "node:fs/promises";
import type { FileHandle } from "node:fs/promises";
import type { FileUnit, ImageFile } from "../image/format.ts";
import { zeroDigest } from "../image/zstd.ts";
import { digestOf } from "../oci/digest.ts";
import type { RegistryClient } from "../registry/client.ts";
import { DEFAULT_CONCURRENCY } from "../util/defaults.ts";
import { fail, SardeError } from "../util/errors.ts";
import { debug, warn } from "../util/log.ts";
import { releaseBytes } from "../util/memory.ts";
import type { BlockSource } from "./nbd.ts";

/** Fetches the compressed bytes of a unit (its `range` of the blob, or the whole blob). */
export type UnitFetcher = (unit: FileUnit, signal?: AbortSignal) => Promise<Uint8Array>;

/**
 * Decodes a unit's compressed bytes; the lazy file verifies what comes out. Both arrays are the
 * lazy file's: it frees the decoded one once written (lib/util/memory.ts), so a decoder must
 * return an array it does not keep.
 */
export type UnitDecoder = (
  compressed: Uint8Array,
  unit: FileUnit,
  signal?: AbortSignal,
) => Promise<Uint8Array>;

/**
 * A run of units whose layout is known only once it is resolved: a framed chunk before its frame
 * table is read. Only their number is fixed up front, so that the presence log (which numbers
 * units) means the same whenever the table is read.
 */
export interface UnitGroup {
  /** Where the group starts in the file. */
  offset: number;
  /** Its bytes. */
  length: number;
  /** How many units it has. */
  count: number;
  /** Its units, in order, tiling it, when they are known from the start. */
  units?: FileUnit[];
  /**
   * Otherwise: gives them (verified, e.g. from a frame table checked against its digest); called
   * on the group's first touch, again only after a failure.
   */
  resolve?(signal?: AbortSignal): Promise<FileUnit[]>;
}

/** A byte range of a file. */
export interface ByteRange {
  offset: number;
  length: number;
}

/** Writes the verified bytes of units `missing` into the file; resolves to those it wrote. */
export type BulkWriter = (missing: number[], signal: AbortSignal) => Promise<number[]>;

/** Options of {@link openLazyFile}. */
export interface LazyFileOptions {
  /** The final file (created sparse at its full size when missing). */
  path: string;
  /** The image file it holds (its size; its name for messages). */
  file: ImageFile;
  /**
   * The file's units, in file order, tiling it (e.g. `chunkUnits(file)`); or `groups` instead.
   */
  units?: FileUnit[];
  /** The file's units as groups resolved on first touch, in file order, tiling it. */
  groups?: UnitGroup[];
  /** Where units come from, e.g. {@link registryUnitFetcher}. */
  fetchUnit: UnitFetcher;
  /** Default: {@link decodeZstdUnit}. */
  decode?: UnitDecoder;
  /** Background fetches in flight at most during {@link LazyFile.prefetch}; default 4. */
  prefetchConcurrency?: number;
  /**
   * Called when a read starts waiting for bytes that are not present; it calls what this returns
   * once they are (the lazy server pauses its background download meanwhile).
   */
  onDemand?: () => () => void;
}

/** An image file being filled on demand; a {@link BlockSource}. Close it when done. */
export interface LazyFile extends BlockSource {
  /** The final file. */
  readonly path: string;
  /** Bytes of the file that are present (verified on disk, or zero units). */
  readonly presentBytes: number;
  /** Whether every unit is present: the file is the image's file. */
  readonly complete: boolean;
  /** Whether unit `i` is present (a restarted download skips decoding it again). */
  has(i: number): boolean;
  /**
   * Fetches every missing unit (of `ranges` only, in their order, when given), in file order, at
   * most `prefetchConcurrency` at once, and starts none while a read is waiting for a unit (reads
   * go first). Resolves when they are present; rejects on the first unit that cannot be had, or
   * with `signal`'s abort.
   */
  prefetch(signal?: AbortSignal, ranges?: ByteRange[]): Promise<void>;
  /**
   * The units of group `g` (of `groups`; unit `g` for `units`), resolving it if needed, and the
   * number of its first unit: what {@link LazyFile.fill} takes.
   */
  group(g: number): Promise<{ first: number; units: FileUnit[] }>;
  /**
   * Offers `data` as the bytes of unit `i` (the background download decoded its chunk from the
   * store): verified against the unit's digest like a fetched unit, then written, synced and
   * logged. Resolves to whether the unit is present afterwards; bytes that do not verify are
   * neither written nor logged (false). A unit already present or in flight is left as it is.
   * Its group must be resolved ({@link LazyFile.group}).
   */
  fill(i: number, data: Uint8Array): Promise<boolean>;
  /**
   * Makes units present in bulk with bytes that `write` puts into {@link LazyFile.path} itself
   * (the background download decodes a chunk from the store straight into the file on a codec
   * worker). `write` gets those of `indices` that are neither present nor in flight, whose range
   * reads as zeros or as their own bytes already (only verified bytes are ever written), and
   * resolves to the ones whose verified bytes it wrote; one sync then makes them durable, one
   * append logs them, and only then are they present. Waits first while reads wait for units
   * (reads go first); `write`'s signal aborts when the file is closed. Their groups must be
   * resolved ({@link LazyFile.group}).
   */
  fillWith(indices: number[], write: BulkWriter): Promise<void>;
  /** Stops the prefetch, waits for units in flight, closes the files. Idempotent. */
  close(): Promise<void>;
  /** Same as {@link LazyFile.close}. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** The suffix of the presence log next to the file. */
export const PRESENCE_LOG_SUFFIX = ".sarde-present";

const ENTRY = 4;

/** A {@link UnitFetcher} reading units from `repository` with `client` (ranged GETs). */
export function registryUnitFetcher(client: RegistryClient, repository: string): UnitFetcher {
  return (unit, signal) => client.readBlob(repository, unit.blob, unit.range, signal);
}

/**
 * Decodes a zstd unit in memory by piping it through `zstd -dc`: lib/image decodes chunks
 * file-to-file on its workers, and has no in-memory decoder. The output is capped at the unit's
 * length plus one byte (a hostile frame cannot make it buffer more) and the window at 32 MiB
 * (what sarde's own decoder allows).
 */
export async function decodeZstdUnit(
  compressed: Uint8Array,
  unit: FileUnit,
  signal?: AbortSignal,
): Promise<Uint8Array> {
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command("zstd", {
      args: ["-dcq", "--memory=32MiB", "--no-progress"],
      stdin: "piped",
      stdout: "piped",
      stderr: "null",
      signal,
    }).spawn();
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) {
      throw fail("external", "zstd not found in PATH", "apt-get install zstd");
    }
    throw fail("external", `cannot run zstd: ${(err as Error).message}`);
  }
  const feeding = (async () => {
    const w = child.stdin.getWriter();
    try {
      await w.write(compressed);
      await w.close();
    } catch { /* zstd stopped reading: its exit status tells why */ }
  })();
  const out = new Uint8Array(unit.length + 1);
  let got = 0;
  let tooLong = false;
  for await (const piece of child.stdout) {
    const n = Math.min(piece.length, out.length - got);
    out.set(piece.subarray(0, n), got);
    got += n;
    if (got === out.length) {
      tooLong = true;
      try {
        child.kill();
      } catch { /* already gone */ }
      break;
    }
  }
  await feeding;
  const status = await child.status;
  signal?.throwIfAborted();
  if (tooLong) throw corrupt(unit, `decodes to more than ${unit.length} bytes`);
  if (!status.success) throw corrupt(unit, "is not a valid zstd frame");
  return out.subarray(0, got);
}

function unitName(unit: FileUnit): string {
  return `blob ${unit.blob.digest.slice(0, 19)}${
    unit.range ? ` (bytes ${unit.range.offset}+${unit.range.length})` : ""
  }`;
}

function corrupt(unit: FileUnit, why: string): SardeError {
  return fail("integrity", `${unitName(unit)} ${why}`);
}

/** Checks that `parts` (units or groups) tile `[from, from + size)` in order. */
function checkTiling(parts: ByteRange[], from: number, size: number, what: string): void {
  let next = from;
  for (const u of parts) {
    if (u.offset !== next || !Number.isSafeInteger(u.length) || u.length < 0) {
      throw fail("integrity", `${what}: the units do not tile the file at ${next}`);
    }
    next += u.length;
  }
  if (next !== from + size) {
    throw fail("integrity", `${what}: the units cover ${next - from} of ${size} bytes`);
  }
}

/** The last index whose start is at most `x`: `starts` ascend (part offsets, first unit numbers). */
function partAt(starts: number[], x: number): number {
  let lo = 0;
  let hi = starts.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (starts[mid] <= x) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** Units as groups of one, resolved from the start. */
function singleGroups(units: FileUnit[]): UnitGroup[] {
  return units.map((u) => ({ offset: u.offset, length: u.length, count: 1, units: [u] }));
}

async function readFully(fh: FileHandle, length: number, position: number): Promise<Uint8Array> {
  const buf = new Uint8Array(length);
  for (let done = 0; done < length;) {
    const { bytesRead } = await fh.read(buf, done, length - done, position + done);
    if (bytesRead === 0) throw fail("io", `unexpected end of file at ${position + done}`);
    done += bytesRead;
  }
  return buf;
}

async function writeFully(fh: FileHandle, data: Uint8Array, position: number): Promise<void> {
  for (let done = 0; done < data.length;) {
    const { bytesWritten } = await fh.write(data, done, data.length - done, position + done);
    done += bytesWritten;
  }
}

/**
 * Group commit: `sync()` resolves once an `fdatasync` that started after the call has finished.
 * One sync covers every write completed before it, so units finishing together share one (a
 * sync per unit would cost a journal commit each), while a unit never waits for more than the
 * sync in progress plus its own.
 */
function groupSync(fh: FileHandle): () => Promise<void> {
  let running: Promise<void> | undefined;
  let next: Promise<void> | undefined;
  const start = (): Promise<void> => {
    const p = fh.datasync().finally(() => {
      if (running === p) running = undefined;
    });
    running = p;
    return p;
  };
  return () => {
    if (!running) return start();
    next ??= running.catch(() => {}).then(() => {
      next = undefined;
      return start();
    });
    return next;
  };
}

/**
 * Reads the presence log: the units listed in it (a torn last entry is cut off), or `undefined`
 * when it lists a unit the file does not have (the log of another file).
 */
async function readLog(
  log: FileHandle,
  count: number,
  what: string,
): Promise<number[] | undefined> {
  const { size } = await log.stat();
  const whole = size - (size % ENTRY);
  if (whole !== size) {
    debug(`${what}: ignoring a torn entry at the end of the presence log`);
    await log.truncate(whole);
  }
  const bytes = whole ? await readFully(log, whole, 0) : new Uint8Array(0);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const units: number[] = [];
  for (let pos = 0; pos < whole; pos += ENTRY) {
    const entry = view.getUint32(pos, true);
    if (entry === 0) continue; // see the module doc: zeros are never written
    if (entry > count) {
      warn(`${what}: the presence log lists unit ${entry - 1} of ${count}: ignoring it`);
      return undefined;
    }
    units.push(entry - 1);
  }
  return units;
}

/**
 * Opens (or creates) the lazy file at `options.path`. A missing file is created sparse at its
 * full size; units listed in its presence log and zero units are present from the start.
 */
export async function openLazyFile(options: LazyFileOptions): Promise<LazyFile> {
  const { path, file, fetchUnit } = options;
  const decode = options.decode ?? decodeZstdUnit;
  const what = `lazy file ${file.name}`;
  const size = file.size;
  if (size === undefined) throw fail("usage", `${what}: the image does not give its size`);
  if ((options.units === undefined) === (options.groups === undefined)) {
    throw fail("usage", `${what}: give either its units or its unit groups`);
  }
  const groups = options.groups ?? singleGroups(options.units!);
  checkTiling(groups, 0, size, what);
  const starts = groups.map((g) => g.offset);
  /** Unit numbers: group g has units first[g] … first[g] + count - 1. */
  const first: number[] = [];
  let count = 0;
  for (const g of groups) {
    if (!Number.isSafeInteger(g.count) || g.count < 1 || (!g.units && !g.resolve)) {
      throw fail("usage", `${what}: a unit group at ${g.offset} without units`);
    }
    first.push(count);
    count += g.count;
  }
  const prefetchConcurrency = options.prefetchConcurrency ?? DEFAULT_CONCURRENCY;
  if (!Number.isInteger(prefetchConcurrency) || prefetchConcurrency < 1) {
    throw fail("usage", `invalid prefetch concurrency ${prefetchConcurrency}`);
  }

  let created = false;
  let fh: FileHandle;
  try {
    fh = await open(path, "r+");
  } catch (err) {
    if ((err as { code?: string }).code !== "ENOENT") {
      throw fail("io", `cannot open ${path}: ${(err as Error).message}`);
    }
    fh = await open(path, "wx+");
    created = true;
  }
  let log: FileHandle | undefined;
  const present = new Uint8Array(count);
  /** Present units per group. */
  const presentIn = new Uint32Array(groups.length);
  /** The units of each group, once resolved. */
  const resolved: (FileUnit[] | undefined)[] = new Array(groups.length);
  /** Present bytes of resolved groups (those of the others are only known by unit count). */
  let resolvedBytes = 0;
  const markPresent = (i: number) => {
    if (present[i]) return;
    present[i] = 1;
    const g = partAt(first, i);
    presentIn[g]++;
    const units = resolved[g];
    if (units) resolvedBytes += units[i - first[g]].length;
  };
  /** Takes the units of group `g`: a zero unit is already there (see below). */
  const adopt = (g: number, units: FileUnit[]) => {
    units.forEach((u, j) => {
      if (present[first[g] + j]) resolvedBytes += u.length;
    });
    resolved[g] = units;
    units.forEach((u, j) => {
      if (u.length > 0 && u.digest === zeroDigest(u.length)) markPresent(first[g] + j);
    });
  };
  try {
    const { size: onDisk } = await fh.stat();
    log = await open(path + PRESENCE_LOG_SUFFIX, "a+");
    const listed = created ? undefined : await readLog(log, count, what);
    if (listed?.length && onDisk === size) listed.forEach(markPresent);
    else {
      // Nothing of the file is known: it starts over as zeros (sparse: nothing allocated), so
      // that zero units below are zeros whatever was in the file before.
      if (!created) debug(`${what}: no usable presence log; ${path} starts over`);
      await fh.truncate(0);
      await fh.truncate(size);
      await log.truncate(0);
    }
    // A zero unit is already there: the file started as zeros, and only verified bytes of other
    // units are ever written.
    groups.forEach((g, i) => {
      if (g.units) {
        checkTiling(g.units, g.offset, g.length, what);
        adopt(i, g.units);
      }
    });
  } catch (err) {
    await fh.close();
    await log?.close();
    if (created) await Deno.remove(path).catch(() => {});
    throw err instanceof SardeError
      ? err
      : fail("io", `cannot open ${path}: ${(err as Error).message}`);
  }
  const presence = log;
  const sync = groupSync(fh);

  const closing = new AbortController();
  let closed: Promise<void> | undefined;
  /** Units being fetched, shared by every reader of them. */
  const inFlight = new Map<number, Promise<void>>();
  /** Groups being resolved, shared likewise. */
  const resolving = new Map<number, Promise<FileUnit[]>>();
  /** Reads waiting for units: while there are any, the prefetch starts no new fetch. */
  let demand = 0;
  const demandDone: (() => void)[] = [];
  /** Bulk fills writing, syncing or logging: close waits for them. */
  const bulk = new Set<Promise<void>>();

  /** Appends entries for `done` to the presence log, in one write. */
  async function logPresent(done: number[]): Promise<void> {
    const entries = new Uint8Array(ENTRY * done.length);
    const view = new DataView(entries.buffer);
    done.forEach((i, k) => view.setUint32(k * ENTRY, i + 1, true));
    const { bytesWritten } = await presence.write(entries, 0, entries.length, null);
    if (bytesWritten !== entries.length) {
      throw fail("io", `${what}: cannot append to the presence log`);
    }
  }

  /** The units of group `g`, resolved once for all who ask (again only after a failure). */
  function resolveGroup(g: number): Promise<FileUnit[]> {
    const known = resolved[g];
    if (known) return Promise.resolve(known);
    let p = resolving.get(g);
    if (!p) {
      p = (async () => {
        const group = groups[g];
        const units = await group.resolve!(closing.signal);
        if (units.length !== group.count) {
          throw fail(
            "integrity",
            `${what}: bytes at ${group.offset} have ${units.length} units, not ${group.count}`,
          );
        }
        checkTiling(units, group.offset, group.length, what);
        adopt(g, units);
        return units;
      })().finally(() => resolving.delete(g));
      resolving.set(g, p);
    }
    return p;
  }

  /** Unit `i` of a resolved group. */
  const unitOf = (i: number): FileUnit => {
    const g = partAt(first, i);
    const units = resolved[g];
    if (!units) throw fail("usage", `${what}: unit ${i} is in a group not resolved yet`);
    return units[i - first[g]];
  };

  /** Fetches, decodes and verifies unit `i`: the first fetch, then once more. */
  async function verified(i: number): Promise<Uint8Array> {
    const signal = closing.signal;
    const unit = unitOf(i);
    let problem: SardeError | undefined;
    for (let attempt = 0; attempt < 2; attempt++) {
      if (problem) warn(`${what}: ${problem.message}; fetching it again`);
      let data: Uint8Array;
      try {
        // A whole blob is checked against its digest as it is fetched: the same kind of fault.
        const compressed = await fetchUnit(unit, signal);
        data = await decode(compressed, unit, signal);
        if (data.buffer !== compressed.buffer) releaseBytes(compressed);
      } catch (err) {
        if (!(err instanceof SardeError) || err.kind !== "integrity") throw err;
        problem = err;
        continue;
      }
      if (data.length !== unit.length) {
        problem = corrupt(unit, `decodes to ${data.length} bytes, not ${unit.length}`);
      } else if (digestOf(data) !== unit.digest) {
        problem = corrupt(unit, `does not decode to ${unit.digest.slice(0, 19)}`);
      } else return data;
      releaseBytes(data);
    }
    throw fail("integrity", `${what}: bytes at ${unit.offset}: ${problem!.message}`);
  }

  /**
   * Makes unit `i` present with the verified bytes `produce` gives: written, synced, logged.
   * Concurrent callers share it, so it runs until done or until the file is closed, whoever asked
   * for it first. With `owned`, the bytes are freed once written.
   */
  function keep(i: number, produce: () => Promise<Uint8Array>, owned = false): Promise<void> {
    if (present[i]) return Promise.resolve();
    let p = inFlight.get(i);
    if (!p) {
      p = (async () => {
        const data = await produce();
        try {
          await writeFully(fh, data, unitOf(i).offset);
        } finally {
          if (owned) releaseBytes(data);
        }
        await sync();
        await logPresent([i]);
        markPresent(i);
      })().finally(() => inFlight.delete(i));
      inFlight.set(i, p);
    }
    return p;
  }

  /** Makes unit `i` (of a resolved group) present, fetching it (see {@link verified}). */
  const ensure = (i: number): Promise<void> => keep(i, () => verified(i), true);

  /** The numbers of the units of resolved group `g` that overlap `[from, to)`. */
  const unitsIn = (g: number, from: number, to: number): number[] =>
    resolved[g]!.flatMap((u, j) =>
      u.offset < to && (u.offset + u.length > from || u.length === 0) ? [first[g] + j] : []
    );

  async function fill(i: number, data: Uint8Array): Promise<boolean> {
    checkOpen();
    if (!Number.isInteger(i) || i < 0 || i >= count) {
      throw fail("usage", `${what}: no unit ${i}`);
    }
    if (present[i]) return true;
    const running = inFlight.get(i);
    if (running) return await running.then(() => true, () => false);
    const unit = unitOf(i);
    if (data.length !== unit.length || digestOf(data) !== unit.digest) {
      warn(`${what}: ${unitName(unit)}: the downloaded bytes do not match; not kept`);
      return false;
    }
    await keep(i, () => Promise.resolve(data));
    return true;
  }

  async function group(g: number): Promise<{ first: number; units: FileUnit[] }> {
    checkOpen();
    if (!Number.isInteger(g) || g < 0 || g >= groups.length) {
      throw fail("usage", `${what}: no unit group ${g}`);
    }
    return { first: first[g], units: await resolveGroup(g) };
  }

  async function fillWith(indices: number[], write: BulkWriter): Promise<void> {
    checkOpen();
    for (const i of indices) {
      if (!Number.isInteger(i) || i < 0 || i >= count) {
        throw fail("usage", `${what}: no unit ${i}`);
      }
      unitOf(i); // its group is resolved
    }
    while (demand > 0 && !closing.signal.aborted) {
      await new Promise<void>((resume) => demandDone.push(resume));
    }
    checkOpen();
    const missing = indices.filter((i) => !present[i] && !inFlight.has(i));
    if (missing.length === 0) return;
    const running = (async () => {
      const asked = new Set(missing);
      const done = (await write(missing, closing.signal)).filter((i) => asked.has(i));
      if (done.length === 0) return;
      // fdatasync covers the file, whichever descriptor wrote it: the bytes are durable before
      // the log lists them.
      await sync();
      await logPresent(done);
      done.forEach(markPresent);
    })();
    bulk.add(running);
    try {
      await running;
    } finally {
      bulk.delete(running);
    }
  }

  const checkOpen = () => {
    if (closed) throw fail("io", `${what} is closed`);
  };

  const checkRange = (offset: number, length: number) => {
    if (
      !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 ||
      offset + length > size!
    ) {
      throw fail("usage", `${what}: bytes ${offset}+${length} are outside its ${size} bytes`);
    }
  };

  async function read(offset: number, length: number): Promise<Uint8Array> {
    checkOpen();
    checkRange(offset, length);
    if (length === 0) return new Uint8Array(0);
    const end = offset + length;
    const touched: number[] = [];
    for (let g = partAt(starts, offset); g < groups.length && groups[g].offset < end; g++) {
      if (presentIn[g] === groups[g].count) continue;
      if (!resolved[g] || unitsIn(g, offset, end).some((i) => !present[i])) touched.push(g);
    }
    if (touched.length) {
      demand++;
      const release = options.onDemand?.();
      try {
        await Promise.all(touched.map(async (g) => {
          await resolveGroup(g);
          await Promise.all(unitsIn(g, offset, end).map(ensure));
        }));
      } finally {
        release?.();
        demand--;
        if (demand === 0) demandDone.splice(0).forEach((resume) => resume());
      }
    }
    return await readFully(fh, length, offset);
  }

  async function prefetch(signal?: AbortSignal, ranges?: ByteRange[]): Promise<void> {
    checkOpen();
    // What to walk, in order: each group a range touches, with the range's bounds.
    const todo: { g: number; from: number; to: number }[] = [];
    for (const r of ranges ?? [{ offset: 0, length: size! }]) {
      checkRange(r.offset, r.length);
      const end = ranges ? r.offset + r.length : Infinity;
      for (let g = partAt(starts, r.offset); g < groups.length && groups[g].offset < end; g++) {
        if (ranges && r.length === 0) break;
        todo.push({ g, from: ranges ? r.offset : -1, to: end });
      }
    }
    // The first failure stops the other workers too.
    const halt = new AbortController();
    const stop = AbortSignal.any([halt.signal, closing.signal, ...(signal ? [signal] : [])]);
    let next = 0;
    const worker = async () => {
      try {
        for (;;) {
          while (demand > 0 && !stop.aborted) {
            await new Promise<void>((resume) => demandDone.push(resume));
          }
          stop.throwIfAborted();
          const item = todo[next];
          if (!item) break;
          if (presentIn[item.g] < groups[item.g].count) await resolveGroup(item.g);
          const i = presentIn[item.g] < groups[item.g].count
            ? unitsIn(item.g, item.from, item.to).find((i) => !present[i] && !inFlight.has(i))
            : undefined;
          if (i === undefined) {
            if (todo[next] === item) next++;
            continue;
          }
          await ensure(i);
        }
      } catch (err) {
        halt.abort(err);
        throw err;
      }
    };
    const abort = () => demandDone.splice(0).forEach((resume) => resume());
    stop.addEventListener("abort", abort, { once: true });
    const workers = Array.from({ length: prefetchConcurrency }, worker);
    try {
      await Promise.all(workers);
      // Units that readers were fetching when the walk passed them (or that failed for them).
      for (const { g, from, to } of todo) {
        await resolveGroup(g);
        await Promise.all(unitsIn(g, from, to).map(ensure));
      }
    } finally {
      stop.removeEventListener("abort", abort);
      await Promise.allSettled(workers);
    }
  }

  async function close(): Promise<void> {
    closed ??= (async () => {
      closing.abort(fail("interrupted", `${what} was closed`));
      demandDone.splice(0).forEach((resume) => resume());
      await Promise.allSettled([...inFlight.values(), ...resolving.values(), ...bulk]);
      await fh.close();
      await presence.close();
    })();
    return await closed;
  }

  return {
    path,
    size,
    get presentBytes() {
      // A group not resolved yet counts its present units as of average size.
      let bytes = resolvedBytes;
      groups.forEach((g, i) => {
        if (!resolved[i] && presentIn[i] > 0) {
          bytes += Math.floor(g.length * presentIn[i] / g.count);
        }
      });
      return bytes;
    },
    get complete() {
      return present.every((p) => p === 1);
    },
    has: (i) => present[i] === 1,
    read,
    prefetch,
    group,
    fill,
    fillWith,
    close,
    [Symbol.asyncDispose]: close,
  };
}
