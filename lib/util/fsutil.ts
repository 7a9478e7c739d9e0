/**
 * Crash-safe file primitives: atomic writes (temp file + fsync + rename) and advisory locks.
 *
 * @module
 */

import { basename, dirname, isAbsolute, join } from "node:path";
import { fail } from "./errors.ts";
import { debug } from "./log.ts";

/** A temp-file name beside `path`, hidden and unique, so a rename into place is atomic. */
export function tempPathBeside(path: string): string {
  const rand = crypto.getRandomValues(new Uint32Array(2)).join("");
  return join(dirname(path), `.${basename(path)}.tmp-${Deno.pid}-${rand}`);
}

/** Fsyncs a directory so a rename inside it survives a crash. */
export async function syncDir(dir: string): Promise<void> {
  try {
    using d = await Deno.open(dir, { read: true });
    await d.sync();
  } catch {
    // Some filesystems refuse fsync on directories; the rename is still atomic.
  }
}

/**
 * The file a path finally names, following symbolic links (also dangling ones, which
 * `Deno.realPath` refuses), so that an atomic replace updates the link's target and keeps the
 * link: users point `auth.json` at a shared or managed file and expect it to stay a link.
 */
export async function followSymlinks(path: string): Promise<string> {
  let current = path;
  for (let hops = 0; hops < 40; hops++) {
    let target: string;
    try {
      target = await Deno.readLink(current);
    } catch {
      return current; // not a link (or not there): this is the file
    }
    current = isAbsolute(target) ? target : join(dirname(current), target);
  }
  throw fail("io", `cannot write ${path}: too many levels of symbolic links`);
}

/** Writes `data` to `path` atomically: readers see the old or the new file, never a torn one. */
export async function writeFileAtomic(
  path: string,
  data: Uint8Array | string,
  options: { mode?: number } = {},
): Promise<void> {
  const tmp = tempPathBeside(path);
  const bytes = typeof data === "string" ? new TextEncoder().encode(data) : data;
  try {
    using file = await Deno.open(tmp, {
      write: true,
      createNew: true,
      mode: options.mode ?? 0o644,
    });
    let off = 0;
    while (off < bytes.length) off += await file.write(bytes.subarray(off));
    await file.sync();
    if (options.mode !== undefined) await Deno.chmod(tmp, options.mode);
  } catch (err) {
    await Deno.remove(tmp).catch(() => {});
    throw fail("io", `cannot write ${path}: ${osReason(err)}`);
  }
  try {
    await Deno.rename(tmp, path);
  } catch (err) {
    await Deno.remove(tmp).catch(() => {});
    throw fail("io", `cannot write ${path}: ${osReason(err)}`);
  }
  await syncDir(dirname(path));
}

/** A held advisory lock; release it with `using` or {@link FileLock.release}. */
export interface FileLock extends Disposable {
  release(): void;
}

/** Options of {@link lockFile} and {@link tryLockFile}. */
export interface LockOptions {
  /** A shared lock (any number of holders) instead of an exclusive one. */
  shared?: boolean;
  /**
   * Do not create the lock file's folder: a missing folder is a `not-found` error (a reader
   * must not bring back a folder that `sarde rm` just removed).
   */
  folderMustExist?: boolean;
  /**
   * Go on without a lock when the lock file cannot be made for lack of permission or on a
   * read-only file system but its folder exists (a store this user may only read: nobody
   * removes anything from it on this user's behalf). Without it, that is an `io` error naming
   * the lock file.
   */
  optional?: boolean;
}

/**
 * Takes a `flock` on `path` (created if needed), waiting for conflicting holders. The kernel
 * drops it if the process dies, so a crash never leaves a stale lock.
 */
export async function lockFile(path: string, options: LockOptions = {}): Promise<FileLock> {
  return (await acquire(path, options, true))!;
}

/** {@link lockFile}, but `undefined` at once instead of waiting when another holder conflicts. */
export function tryLockFile(
  path: string,
  options: LockOptions = {},
): Promise<FileLock | undefined> {
  return acquire(path, options, false);
}

async function acquire(
  path: string,
  options: LockOptions,
  wait: boolean,
): Promise<FileLock | undefined> {
  const exclusive = !options.shared;
  for (let attempt = 0;; attempt++) {
    let file: Deno.FsFile;
    try {
      if (!options.folderMustExist) await Deno.mkdir(dirname(path), { recursive: true });
      file = await openLockFile(path);
    } catch (err) {
      let missing = err instanceof Deno.errors.NotFound || err instanceof Deno.errors.NotADirectory;
      if (options.optional && isPermissionError(err)) {
        // A folder this user may only read (or on a read-only mount): nobody removes anything
        // from it on this user's behalf, so it is used unlocked, without writing into it.
        const there = await exists(dirname(path)).catch(() => undefined);
        if (there) {
          debug(`using ${dirname(path)} unlocked: cannot make ${path} (${osReason(err)})`);
          return unlocked;
        }
        missing = there === false;
      }
      if (missing) {
        // The folder went between mkdir and open (a removal racing us): make it again.
        if (!options.folderMustExist && attempt < 100) continue;
        throw fail("not-found", `cannot lock ${path}: ${dirname(path)} does not exist`);
      }
      throw fail("io", `cannot lock ${path}: ${osReason(err)}`);
    }
    try {
      const locked = wait ? (await file.lock(exclusive), true) : await file.tryLock(exclusive);
      if (!locked) {
        file.close();
        return undefined;
      }
      // Whoever deletes a lock file (sarde rm and prune, with a folder they remove) holds the
      // lock while doing so: a process that waited on the deleted file holds a lock nobody
      // else can see, and must lock the file now at the path instead.
      const held = await file.stat();
      const now = await Deno.stat(path).catch(() => undefined);
      if (now?.ino === held.ino && now?.dev === held.dev) return heldLock(file);
    } catch (err) {
      file.close();
      throw fail("io", `cannot lock ${path}: ${osReason(err)}`);
    }
    file.close();
  }
}

/**
 * Opens a lock file, made if needed. One this user may not write is opened for reading (flock
 * works on that too); one it may not make either fails with the reason it cannot be made, never
 * as "not found", which would say the folder is gone.
 */
async function openLockFile(path: string): Promise<Deno.FsFile> {
  try {
    return await Deno.open(path, { read: true, write: true, create: true });
  } catch (err) {
    if (!isPermissionError(err)) throw err;
    try {
      return await Deno.open(path, { read: true });
    } catch (readErr) {
      throw readErr instanceof Deno.errors.NotFound ? err : readErr;
    }
  }
}

/** Lack of permission (EACCES, EPERM) or a read-only file system (EROFS). */
function isPermissionError(err: unknown): boolean {
  return err instanceof Deno.errors.PermissionDenied ||
    (err as { code?: string })?.code === "EROFS";
}

const unlocked: FileLock = { release() {}, [Symbol.dispose]() {} };

function heldLock(file: Deno.FsFile): FileLock {
  let held = true;
  const release = () => {
    if (!held) return;
    held = false;
    try {
      file.unlock();
    } finally {
      file.close();
    }
  };
  return { release, [Symbol.dispose]: release };
}

/** One lock made of several, released in reverse order. */
export function combineLocks(...locks: FileLock[]): FileLock {
  const release = () => locks.toReversed().forEach((l) => l.release());
  return { release, [Symbol.dispose]: release };
}

/**
 * Whether process `pid` exists now: a PID recorded in a claim, hold or lock file by a process
 * that may have died since. (A PID can be reused; callers that care also bound the record's age.)
 */
export function processExists(pid: number): Promise<boolean> {
  return exists(`/proc/${pid}`);
}

/** Whether a path exists (any type). A path through a file (`/etc/passwd/x`) does not. */
export async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound || err instanceof Deno.errors.NotADirectory) {
      return false;
    }
    throw err;
  }
}

/**
 * An OS error in words for a one-line message: "no space left on device", without Deno's
 * "(os error 28): write '…'" tail (messages name the file themselves). Self-contained (it
 * references nothing outside its body): the codec workers run its source
 * (lib/image/codec_worker.ts).
 */
export function osReason(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  const os = /^(.+?) \(os error \d+\)/.exec(message);
  return os ? os[1].charAt(0).toLowerCase() + os[1].slice(1) : message;
}

/**
 * Checks that `dir` (sarde's `what`, e.g. "the local store") is a folder sarde can read, with a
 * one-line error naming it otherwise. Returns false when it does not exist (yet).
 */
export async function checkDir(dir: string, what: string, hint?: string): Promise<boolean> {
  let st: Deno.FileInfo;
  try {
    st = await Deno.stat(dir);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return false;
    if (err instanceof Deno.errors.NotADirectory) throw notAFolder(dir, what, hint);
    throw fail("io", `cannot use ${dir} as ${what}: ${osReason(err)}`, hint);
  }
  if (!st.isDirectory) throw notAFolder(dir, what, hint);
  try {
    for await (const _ of Deno.readDir(dir)) break;
  } catch (err) {
    throw fail("io", `cannot use ${dir} as ${what}: ${osReason(err)}`, hint);
  }
  return true;
}

/** {@link checkDir}, then makes the folder (and its parents) when it does not exist. */
export async function ensureDir(dir: string, what: string, hint?: string): Promise<void> {
  if (await checkDir(dir, what, hint)) return;
  try {
    await Deno.mkdir(dir, { recursive: true });
  } catch (err) {
    if (err instanceof Deno.errors.NotADirectory || err instanceof Deno.errors.AlreadyExists) {
      throw notAFolder(dir, what, hint);
    }
    throw fail("io", `cannot create ${what} ${dir}: ${osReason(err)}`, hint);
  }
}

function notAFolder(dir: string, what: string, hint?: string) {
  return fail("usage", `${what} ${dir} is not a folder`, hint);
}

/** Free bytes on the filesystem holding `path` (via `df`), or undefined if unknown. */
export async function freeBytes(path: string): Promise<number | undefined> {
  try {
    const out = await new Deno.Command("df", {
      args: ["-B1", "--output=avail", path],
      stdout: "piped",
      stderr: "null",
    })
      .output();
    const n = Number(new TextDecoder().decode(out.stdout).trim().split("\n").at(-1));
    return out.success && Number.isFinite(n) ? n : undefined;
  } catch {
    return undefined;
  }
}

/** Marks a file as just used (`sarde prune` removes the least recently used first). */
export async function touch(path: string): Promise<void> {
  const now = new Date();
  await Deno.utime(path, now, now).catch(() => {});
}

/**
 * The processes that have `path` open (from `/proc/PID/fd`, which root sees for every process;
 * others only for their own): a file renamed away while open is still theirs, by descriptor.
 * Matched by device and inode, so a name the file had when it was opened does not matter.
 */
export async function processesHolding(path: string): Promise<number[]> {
  const { dev, ino } = await Deno.stat(path);
  const holders: number[] = [];
  for await (const p of Deno.readDir("/proc")) {
    if (!/^\d+$/.test(p.name)) continue;
    try {
      for await (const fd of Deno.readDir(`/proc/${p.name}/fd`)) {
        const s = await Deno.stat(`/proc/${p.name}/fd/${fd.name}`).catch(() => undefined);
        if (s?.dev === dev && s.ino === ino) {
          holders.push(Number(p.name));
          break;
        }
      }
    } catch { /* gone, or not ours to see */ }
  }
  return holders;
}
