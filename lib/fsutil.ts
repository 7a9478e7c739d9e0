/**
 * Crash-safe file primitives: atomic writes (temp file + fsync + rename) and advisory locks.
 *
 * @module
 */

import { basename, dirname, isAbsolute, join } from "node:path";
import { fail } from "./errors.ts";

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
    throw fail("io", `cannot write ${path}: ${(err as Error).message}`);
  }
  try {
    await Deno.rename(tmp, path);
  } catch (err) {
    await Deno.remove(tmp).catch(() => {});
    throw fail("io", `cannot write ${path}: ${(err as Error).message}`);
  }
  await syncDir(dirname(path));
}

/** A held advisory lock; release it with `using` or {@link FileLock.release}. */
export interface FileLock extends Disposable {
  release(): void;
}

/**
 * Takes an exclusive `flock` on `path` (created if needed), waiting for other holders. The kernel
 * drops it if the process dies, so a crash never leaves a stale lock.
 */
export async function lockFile(path: string): Promise<FileLock> {
  await Deno.mkdir(dirname(path), { recursive: true });
  const file = await Deno.open(path, { read: true, write: true, create: true });
  try {
    await file.lock(true);
  } catch (err) {
    file.close();
    throw fail("io", `cannot lock ${path}: ${(err as Error).message}`);
  }
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

/** Whether a path exists (any type). */
export async function exists(path: string): Promise<boolean> {
  try {
    await Deno.lstat(path);
    return true;
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return false;
    throw err;
  }
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
