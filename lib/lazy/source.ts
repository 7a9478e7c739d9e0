/**
 * The lazy file (docs/lazy-pull.md, part 3): an image file that can be read before it has been
 * downloaded. A read maps to the file's units ({@link FileUnit}); a unit that is not present yet
 * is fetched, decoded, verified, written into the final sparse file, made durable and recorded in
 * a presence log, and then read from the file like any present one.
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
import type { BlockSource } from "./nbd.ts";

/** Fetches the compressed bytes of a unit (its `range` of the blob, or the whole blob). */
export type UnitFetcher = (unit: FileUnit, signal?: AbortSignal) => Promise<Uint8Array>;

/** Decodes a unit's compressed bytes; the lazy file verifies what comes out. */
export type UnitDecoder = (
  compressed: Uint8Array,
  unit: FileUnit,
  signal?: AbortSignal,
) => Promise<Uint8Array>;

/** Options of {@link openLazyFile}. */
export interface LazyFileOptions {
  /** The final file (created sparse at its full size when missing). */
  path: string;
  /** The image file it holds (its size; its name for messages). */
  file: ImageFile;
  /** The file's units, in file order, tiling it (e.g. `chunkUnits(file)`). */
  units: FileUnit[];
  /** Where units come from, e.g. {@link registryUnitFetcher}. */
  fetchUnit: UnitFetcher;
  /** Default: {@link decodeZstdUnit}. */
  decode?: UnitDecoder;
  /** Background fetches in flight at most during {@link LazyFile.prefetch}; default 4. */
  prefetchConcurrency?: number;
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
   * Fetches every missing unit, in file order, at most `prefetchConcurrency` at once, and starts
   * none while a read is waiting for a unit (reads go first). Resolves when the file is
   * complete; rejects on the first unit that cannot be had, or with `signal`'s abort.
   */
  prefetch(signal?: AbortSignal): Promise<void>;
  /**
   * Offers `data` as the bytes of unit `i` (the background download decoded its chunk from the
   * store): verified against the unit's digest like a fetched unit, then written, synced and
   * logged. Resolves to whether the unit is present afterwards; bytes that do not verify are
   * neither written nor logged (false). A unit already present or in flight is left as it is.
   */
  fill(i: number, data: Uint8Array): Promise<boolean>;
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

/** Checks that `units` tile `[0, size)` in order: reads map to them by offset. */
function checkUnits(units: FileUnit[], size: number, what: string): void {
  let next = 0;
  for (const u of units) {
    if (u.offset !== next || !Number.isSafeInteger(u.length) || u.length < 0) {
      throw fail("integrity", `${what}: the units do not tile the file at ${next}`);
    }
    next += u.length;
  }
  if (next !== size) throw fail("integrity", `${what}: the units cover ${next} of ${size} bytes`);
}

/** The unit holding byte `offset` (units tile the file: a binary search). */
function unitAt(units: FileUnit[], offset: number): number {
  let lo = 0;
  let hi = units.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (units[mid].offset <= offset) lo = mid;
    else hi = mid - 1;
  }
  return lo;
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
  const { path, file, units, fetchUnit } = options;
  const decode = options.decode ?? decodeZstdUnit;
  const what = `lazy file ${file.name}`;
  const size = file.size;
  if (size === undefined) throw fail("usage", `${what}: the image does not give its size`);
  checkUnits(units, size, what);
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
  const present = new Uint8Array(units.length);
  let presentBytes = 0;
  const markPresent = (i: number) => {
    if (present[i]) return;
    present[i] = 1;
    presentBytes += units[i].length;
  };
  try {
    const { size: onDisk } = await fh.stat();
    log = await open(path + PRESENCE_LOG_SUFFIX, "a+");
    const listed = created ? undefined : await readLog(log, units.length, what);
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
    units.forEach((u, i) => {
      if (u.length > 0 && u.digest === zeroDigest(u.length)) markPresent(i);
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
  /** Reads waiting for units: while there are any, the prefetch starts no new fetch. */
  let demand = 0;
  const demandDone: (() => void)[] = [];

  /** Fetches, decodes and verifies unit `i`: the first fetch, then once more. */
  async function verified(i: number): Promise<Uint8Array> {
    const signal = closing.signal;
    const unit = units[i];
    let problem: SardeError | undefined;
    for (let attempt = 0; attempt < 2; attempt++) {
      if (problem) warn(`${what}: ${problem.message}; fetching it again`);
      let data: Uint8Array;
      try {
        // A whole blob is checked against its digest as it is fetched: the same kind of fault.
        data = await decode(await fetchUnit(unit, signal), unit, signal);
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
    }
    throw fail("integrity", `${what}: bytes at ${unit.offset}: ${problem!.message}`);
  }

  /**
   * Makes unit `i` present with the verified bytes `produce` gives: written, synced, logged.
   * Concurrent callers share it, so it runs until done or until the file is closed, whoever asked
   * for it first.
   */
  function keep(i: number, produce: () => Promise<Uint8Array>): Promise<void> {
    if (present[i]) return Promise.resolve();
    let p = inFlight.get(i);
    if (!p) {
      p = (async () => {
        const data = await produce();
        await writeFully(fh, data, units[i].offset);
        await sync();
        const entry = new Uint8Array(ENTRY);
        new DataView(entry.buffer).setUint32(0, i + 1, true);
        const { bytesWritten } = await presence.write(entry, 0, ENTRY, null);
        if (bytesWritten !== ENTRY) throw fail("io", `${what}: cannot append to the presence log`);
        markPresent(i);
      })().finally(() => inFlight.delete(i));
      inFlight.set(i, p);
    }
    return p;
  }

  /** Makes unit `i` present, fetching it (see {@link verified}). */
  const ensure = (i: number): Promise<void> => keep(i, () => verified(i));

  async function fill(i: number, data: Uint8Array): Promise<boolean> {
    checkOpen();
    if (!Number.isInteger(i) || i < 0 || i >= units.length) {
      throw fail("usage", `${what}: no unit ${i}`);
    }
    if (present[i]) return true;
    const running = inFlight.get(i);
    if (running) return await running.then(() => true, () => false);
    const unit = units[i];
    if (data.length !== unit.length || digestOf(data) !== unit.digest) {
      warn(`${what}: ${unitName(unit)}: the downloaded bytes do not match; not kept`);
      return false;
    }
    await keep(i, () => Promise.resolve(data));
    return true;
  }

  const checkOpen = () => {
    if (closed) throw fail("io", `${what} is closed`);
  };

  async function read(offset: number, length: number): Promise<Uint8Array> {
    checkOpen();
    if (
      !Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 ||
      offset + length > size!
    ) {
      throw fail("usage", `${what}: bytes ${offset}+${length} are outside its ${size} bytes`);
    }
    if (length === 0) return new Uint8Array(0);
    const missing: number[] = [];
    for (
      let i = unitAt(units, offset);
      i < units.length && units[i].offset < offset + length;
      i++
    ) {
      if (!present[i]) missing.push(i);
    }
    if (missing.length) {
      demand++;
      try {
        await Promise.all(missing.map(ensure));
      } finally {
        demand--;
        if (demand === 0) demandDone.splice(0).forEach((resume) => resume());
      }
    }
    return await readFully(fh, length, offset);
  }

  async function prefetch(signal?: AbortSignal): Promise<void> {
    checkOpen();
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
          while (next < units.length && (present[next] || inFlight.has(next))) next++;
          if (next >= units.length) break;
          await ensure(next++);
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
      await Promise.all(units.map((_, i) => ensure(i)));
    } finally {
      stop.removeEventListener("abort", abort);
      await Promise.allSettled(workers);
    }
  }

  async function close(): Promise<void> {
    closed ??= (async () => {
      closing.abort(fail("interrupted", `${what} was closed`));
      demandDone.splice(0).forEach((resume) => resume());
      await Promise.allSettled([...inFlight.values()]);
      await fh.close();
      await presence.close();
    })();
    return await closed;
  }

  return {
    path,
    size,
    get presentBytes() {
      return presentBytes;
    },
    get complete() {
      return present.every((p) => p === 1);
    },
    has: (i) => present[i] === 1,
    read,
    prefetch,
    fill,
    close,
    [Symbol.asyncDispose]: close,
  };
}
