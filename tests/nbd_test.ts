/**
 * sarde's read-only NBD server (lib/lazy/nbd.ts) against QEMU's own NBD client (`qemu-img`,
 * `qemu-io`, `qemu-nbd --list`), plus a few hand-written protocol messages for what QEMU never
 * sends (garbage, writes on a read-only export, requests out of bounds).
 */

import assert from "node:assert/strict";
import { join } from "node:path";
import { type BlockSource, openFileSource, serveNbd } from "../lib/lazy/mod.ts";
import {
  createPlainQcow2,
  createSparseRaw,
  makeVmDir,
  removeVmDir,
  sh,
  shTry,
} from "./support/vms.ts";

const MiB = 1024 * 1024;
const KiB = 1024;

function nbdUri(socket: string, name: string): string {
  return `nbd+unix:///${name}?socket=${socket}`;
}

/** `qemu-io -r -f raw` on an export; the exit code and output. */
function qemuIoNbd(socket: string, name: string, commands: string[]) {
  const args = ["-r", "-f", "raw"];
  for (const c of commands) args.push("-c", c);
  return shTry("qemu-io", [...args, nbdUri(socket, name)]);
}

/** A source over a byte array, with a hook run before each read. */
function memorySource(
  data: Uint8Array,
  before?: (offset: number, length: number) => Promise<void>,
): BlockSource {
  return {
    size: data.length,
    async read(offset, length) {
      await before?.(offset, length);
      return data.slice(offset, offset + length);
    },
  };
}

function patterned(size: number, parts: [number, number, number][]): Uint8Array {
  const b = new Uint8Array(size);
  for (const [pattern, offset, length] of parts) b.fill(pattern, offset, offset + length);
  return b;
}

Deno.test("nbd: qemu-img reads a raw and a qcow2 file as two exports of one socket", async () => {
  const dir = await makeVmDir("nbd");
  try {
    const qcow2 = await createPlainQcow2(dir, { size: 8 * MiB });
    const raw = await createSparseRaw(dir);
    await using q = await openFileSource(qcow2.path);
    await using r = await openFileSource(raw.path);
    const socketDir = join(dir, "run");
    const socket = join(socketDir, "nbd.sock");
    const server = await serveNbd({ socketPath: socket, exports: { root: q, "data disk": r } });
    try {
      // QEMU under qemu:///system runs as libvirt-qemu: the socket is that user's, the directory
      // only traversable by others.
      const st = await Deno.stat(socket);
      const passwd = await Deno.readTextFile("/etc/passwd");
      const qemuUid = Number(passwd.match(/^libvirt-qemu:[^:]*:(\d+):/m)![1]);
      assert.deepEqual(st.uid, qemuUid);
      assert.deepEqual(st.mode! & 0o777, 0o600);
      assert.deepEqual((await Deno.stat(socketDir)).mode! & 0o777, 0o711);

      const info = await sh("qemu-img", ["info", "--output=json", nbdUri(socket, "root")]);
      assert.deepEqual(JSON.parse(info).format, "qcow2");
      assert.deepEqual(JSON.parse(info)["virtual-size"], 8 * MiB);
      await sh("qemu-img", ["compare", nbdUri(socket, "root"), qcow2.path]);
      // the name needs URI escaping; -f raw so QEMU does not probe the format
      await sh("qemu-img", [
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        nbdUri(socket, "data%20disk"),
        raw.path,
      ]);
      // a different file is different (compare is not vacuous)
      const other = await shTry("qemu-img", [
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        nbdUri(socket, "data%20disk"),
        (await createSparseRaw(dir, { name: "other.raw", size: 32 * MiB })).path,
      ]);
      assert(other.code !== 0, other.stdout);

      // NBD_OPT_LIST, then NBD_OPT_INFO per export
      const list = await sh("qemu-nbd", ["--list", "-k", socket]);
      assert.match(list, /export: 'root'/);
      assert.match(list, /export: 'data disk'/);
      assert.match(list, /size:\s+67108864/);
      assert.match(list, /readonly/);
    } finally {
      await server.close();
    }
    // nothing left behind
    assert.deepEqual(await exists(socketDir), false);
  } finally {
    await removeVmDir(dir);
  }
});

Deno.test("nbd: concurrent reads are answered out of order", async () => {
  const dir = await makeVmDir("nbd");
  const socket = join(dir, "run", "s");
  const data = patterned(4 * MiB, [[0x11, 0, 64 * KiB], [0x22, 2 * MiB, 64 * KiB]]);
  // The read at 0 is held until the read at 2 MiB has been answered: a server that replied in
  // request order (or read one request at a time) would never release it.
  let secondAnswered!: () => void;
  const second = new Promise<void>((r) => secondAnswered = r);
  const order: number[] = [];
  const source = memorySource(data, async (offset) => {
    if (offset === 0) {
      const timeout = new Promise<never>((_, reject) => {
        const t = setTimeout(() => reject(new Error("never released")), 10_000);
        second.then(() => clearTimeout(t));
      });
      await Promise.race([second, timeout]);
    } else {
      queueMicrotask(() => setTimeout(secondAnswered, 50));
    }
    order.push(offset);
  });
  try {
    await using _server = await serveNbd({ socketPath: socket, exports: { d: source } });
    const r = await qemuIoNbd(socket, "d", [
      "aio_read -P 0x11 0 64k",
      "aio_read -P 0x22 2M 64k",
      "aio_flush",
    ]);
    assert.deepEqual(r.code, 0, r.stdout + r.stderr);
    assert(!/fail|error/i.test(r.stdout + r.stderr), r.stdout + r.stderr);
    assert.match(r.stdout, /read 65536\/65536 bytes at offset 0\b/);
    assert.match(r.stdout, /read 65536\/65536 bytes at offset 2097152\b/);
    assert.deepEqual(order, [2 * MiB, 0]);
  } finally {
    await removeVmDir(dir);
  }
});

Deno.test("nbd: a failing source costs that request an I/O error, the server keeps serving", async () => {
  const dir = await makeVmDir("nbd");
  const socket = join(dir, "run", "s");
  const data = patterned(4 * MiB, [[0x33, MiB, MiB]]);
  const source = memorySource(data, (offset) => {
    if (offset < 64 * KiB) return Promise.reject(new Error("registry unreachable"));
    return Promise.resolve();
  });
  try {
    await using _server = await serveNbd({ socketPath: socket, exports: { d: source } });
    const bad = await qemuIoNbd(socket, "d", ["read 0 4k"]);
    assert.match(bad.stdout + bad.stderr, /Input\/output error/);
    // the same client's next request, then a second client
    const mixed = await qemuIoNbd(socket, "d", ["read 0 4k", "read -P 0x33 1M 4k"]);
    assert.match(mixed.stdout + mixed.stderr, /Input\/output error/);
    assert.match(mixed.stdout, /read 4096\/4096 bytes at offset 1048576/);
    const good = await qemuIoNbd(socket, "d", ["read -P 0x33 1M 1M"]);
    assert.deepEqual(good.code, 0, good.stdout + good.stderr);
    assert(!/fail|error/i.test(good.stdout + good.stderr), good.stdout + good.stderr);
  } finally {
    await removeVmDir(dir);
  }
});

Deno.test("nbd: an unknown export is refused cleanly", async () => {
  const dir = await makeVmDir("nbd");
  const socket = join(dir, "run", "s");
  try {
    await using _server = await serveNbd({
      socketPath: socket,
      exports: { d: memorySource(new Uint8Array(MiB)) },
    });
    const r = await shTry("qemu-img", ["info", nbdUri(socket, "nope")]);
    assert(r.code !== 0);
    assert.match(r.stderr, /nope/);
    // NBD_OPT_EXPORT_NAME (old clients) cannot get an error reply: the server hangs up
    const c = await Deno.connect({ transport: "unix", path: socket });
    try {
      await readN(c, 18);
      await c.write(u32(0)); // no NO_ZEROES flag, so a success would send 134 bytes
      await c.write(option(1, new TextEncoder().encode("nope")));
      assert.deepEqual(await readToEnd(c), 0);
    } finally {
      closeQuietly(c);
    }
    const ok = await qemuIoNbd(socket, "d", ["read -P 0 0 4k"]);
    assert.deepEqual(ok.code, 0, ok.stderr);
  } finally {
    await removeVmDir(dir);
  }
});

Deno.test("nbd: clients sending garbage are dropped, the others are unaffected", async () => {
  const dir = await makeVmDir("nbd");
  const socket = join(dir, "run", "s");
  const data = patterned(2 * MiB, [[0x44, 0, 2 * MiB]]);
  try {
    await using _server = await serveNbd({
      socketPath: socket,
      exports: { d: memorySource(data) },
    });
    // a well-behaved client in the transmission phase while the others misbehave
    const good = await Deno.connect({ transport: "unix", path: socket });
    try {
      const size = await handshake(good, "d");
      assert.deepEqual(size, 2 * MiB);

      const garbage: Uint8Array[] = [
        crypto.getRandomValues(new Uint8Array(64)), // as client flags and option header
        concat(u32(0), option(7, new Uint8Array(0)).subarray(0, 12), u32(0xffffffff)), // 4 GiB option
        concat(u32(0x80)), // unknown client flag
      ];
      for (const g of garbage) {
        const c = await Deno.connect({ transport: "unix", path: socket });
        try {
          await readN(c, 18);
          await c.write(g);
          await readToEnd(c); // returns only once the server hangs up
        } finally {
          closeQuietly(c);
        }
      }
      // garbage after a good handshake: the request magic is wrong
      const late = await Deno.connect({ transport: "unix", path: socket });
      try {
        await handshake(late, "d");
        await late.write(crypto.getRandomValues(new Uint8Array(28)));
        assert.deepEqual(await readToEnd(late), 0);
      } finally {
        closeQuietly(late);
      }

      const rep = await request(good, 0, 7, 4096, 8192);
      assert.deepEqual(rep.error, 0);
      assert.deepEqual(rep.data, data.slice(4096, 4096 + 8192));
      const q = await qemuIoNbd(socket, "d", ["read -P 0x44 0 2M"]);
      assert.deepEqual(q.code, 0, q.stderr);
    } finally {
      closeQuietly(good);
    }
  } finally {
    await removeVmDir(dir);
  }
});

Deno.test("nbd: writes are refused, out-of-range requests get EINVAL", async () => {
  const dir = await makeVmDir("nbd");
  const socket = join(dir, "run", "s");
  const data = patterned(MiB, [[0x55, 0, MiB]]);
  try {
    await using _server = await serveNbd({
      socketPath: socket,
      exports: { d: memorySource(data) },
    });
    // QEMU sees the read-only flag and will not even open the export for writing
    const q = await shTry("qemu-io", ["-f", "raw", "-c", "write 0 4k", nbdUri(socket, "d")]);
    assert.notEqual(q.code, 0);
    assert.match(q.stderr, /Permission denied/);

    const c = await Deno.connect({ transport: "unix", path: socket });
    try {
      await handshake(c, "d");
      const EPERM = 1, EINVAL = 22;
      // WRITE carries a payload; the server must consume it and stay in step
      assert.deepEqual((await request(c, 1, 1, 0, 4096, new Uint8Array(4096))).error, EPERM);
      assert.deepEqual((await request(c, 4, 2, 0, 4096)).error, EPERM); // TRIM
      assert.deepEqual((await request(c, 6, 3, 0, 4096)).error, EPERM); // WRITE_ZEROES
      assert.deepEqual((await request(c, 3, 4, 0, 0)).error, 0); // FLUSH
      assert.deepEqual((await request(c, 0, 5, MiB - 4096, 8192)).error, EINVAL); // past the end
      assert.deepEqual((await request(c, 0, 6, 0, 64 * MiB)).error, EINVAL); // over the cap
      const ok = await request(c, 0, 7, 0, 4096);
      assert.deepEqual(ok.error, 0);
      assert.deepEqual(ok.data, data.slice(0, 4096));
      // the file is untouched
      assert.deepEqual(data, patterned(MiB, [[0x55, 0, MiB]]));
      // DISC: the server hangs up
      await c.write(requestHeader(2, 8, 0, 0));
      assert.deepEqual(await readToEnd(c), 0);
    } finally {
      closeQuietly(c);
    }
  } finally {
    await removeVmDir(dir);
  }
});

Deno.test("nbd: a restart takes over a dead server's socket, never a live one or a file", async () => {
  const dir = await makeVmDir("nbd");
  const socket = join(dir, "run", "s");
  const exports = { d: memorySource(patterned(MiB, [[0x66, 0, MiB]])) };
  try {
    // a killed server leaves its socket file behind, and nobody answers on it
    await Deno.mkdir(join(dir, "run"));
    // (Deno's close() would unlink it; a process that exits does not)
    const bind = "import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])";
    await sh("python3", ["-c", bind, socket]);
    assert.ok((await Deno.lstat(socket)).isSocket);
    const server = await serveNbd({ socketPath: socket, exports });
    try {
      await assert.rejects(
        serveNbd({ socketPath: socket, exports }),
        (e: Error) => e.name === "SardeError" && /another server is listening/.test(e.message),
      );
      // an idle client in the transmission phase is hung up on by close()
      const idle = await Deno.connect({ transport: "unix", path: socket });
      try {
        await handshake(idle, "d");
        await server.close();
        assert.equal(await readToEnd(idle), 0);
      } finally {
        closeQuietly(idle);
      }
    } finally {
      await server.close();
    }
    assert.equal(await exists(socket), false);
    assert.ok(await exists(join(dir, "run")), "a directory it did not make stays");

    const file = join(dir, "run", "not-a-socket");
    await Deno.writeTextFile(file, "keep me");
    await assert.rejects(
      serveNbd({ socketPath: file, exports }),
      (e: Error) => e.name === "SardeError" && e.message.includes(file),
    );
    assert.equal(await Deno.readTextFile(file), "keep me");
  } finally {
    await removeVmDir(dir);
  }
});

Deno.test("nbd: limits: silent clients are dropped, the request cap is advertised", async () => {
  const dir = await makeVmDir("nbd");
  const socket = join(dir, "run", "s");
  const data = patterned(4 * MiB, [[0x77, 0, 3 * MiB]]);
  await Deno.writeFile(join(dir, "d.raw"), data);
  try {
    await using _server = await serveNbd({
      socketPath: socket,
      exports: { d: memorySource(data) },
      maxRequest: MiB,
      handshakeTimeoutMs: 300,
    });
    const silent = await Deno.connect({ transport: "unix", path: socket });
    const busy = await Deno.connect({ transport: "unix", path: socket });
    try {
      await handshake(busy, "d");
      assert.equal(await readToEnd(silent), 18); // the greeting, then nothing until hung up
      // a client past the handshake is never timed out
      await new Promise((r) => setTimeout(r, 500));
      assert.deepEqual((await request(busy, 0, 1, 0, 4096)).data, data.slice(0, 4096));
      assert.equal((await request(busy, 0, 2, 0, 2 * MiB)).error, 22);
    } finally {
      closeQuietly(silent);
      closeQuietly(busy);
    }
    // QEMU learns the cap (NBD_INFO_BLOCK_SIZE) and splits its requests to fit
    assert.match(await sh("qemu-nbd", ["--list", "-k", socket]), /max block: 1048576/);
    await sh("qemu-img", [
      "compare",
      "-f",
      "raw",
      "-F",
      "raw",
      nbdUri(socket, "d"),
      join(dir, "d.raw"),
    ]);
  } finally {
    await removeVmDir(dir);
  }
});

// ---------------------------------------------------------------------------------------------
// a minimal hand-written NBD client (proto.md), for what QEMU never sends

function u32(n: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

function option(opt: number, data: Uint8Array): Uint8Array {
  const b = new Uint8Array(16 + data.length);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, 0x49484156454f5054n); // IHAVEOPT
  v.setUint32(8, opt);
  v.setUint32(12, data.length);
  b.set(data, 16);
  return b;
}

function requestHeader(type: number, handle: number, offset: number, length: number): Uint8Array {
  const b = new Uint8Array(28);
  const v = new DataView(b.buffer);
  v.setUint32(0, 0x25609513);
  v.setUint16(6, type);
  v.setBigUint64(8, BigInt(handle));
  v.setBigUint64(16, BigInt(offset));
  v.setUint32(24, length);
  return b;
}

async function readN(c: Deno.Conn, n: number): Promise<Uint8Array> {
  const b = new Uint8Array(n);
  for (let off = 0; off < n;) {
    const got = await c.read(b.subarray(off));
    if (got === null) throw new Error(`EOF after ${off} of ${n} bytes`);
    off += got;
  }
  return b;
}

/** Reads until the server hangs up (10 s at most); how many bytes came before. */
async function readToEnd(c: Deno.Conn): Promise<number> {
  const b = new Uint8Array(4096);
  let total = 0;
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    c.close();
  }, 10_000);
  try {
    for (;;) {
      const got = await c.read(b).catch(() => null);
      if (timedOut) throw new Error("the server did not hang up");
      if (got === null) return total;
      total += got;
    }
  } finally {
    clearTimeout(timer);
  }
}

/** Fixed newstyle handshake with NBD_OPT_EXPORT_NAME and NO_ZEROES; the export's size. */
async function handshake(c: Deno.Conn, name: string): Promise<number> {
  const greet = new DataView((await readN(c, 18)).buffer);
  assert.deepEqual(greet.getBigUint64(0), 0x4e42444d41474943n);
  assert.deepEqual(greet.getBigUint64(8), 0x49484156454f5054n);
  assert.deepEqual(greet.getUint16(16) & 3, 3);
  await c.write(u32(3));
  await c.write(option(1, new TextEncoder().encode(name)));
  const v = new DataView((await readN(c, 10)).buffer);
  assert.deepEqual(v.getUint16(8) & 3, 3); // HAS_FLAGS | READ_ONLY
  return Number(v.getBigUint64(0));
}

/** One request and its simple reply (data only for a successful READ). */
async function request(
  c: Deno.Conn,
  type: number,
  handle: number,
  offset: number,
  length: number,
  payload?: Uint8Array,
): Promise<{ error: number; data?: Uint8Array }> {
  await c.write(
    payload
      ? concat(requestHeader(type, handle, offset, length), payload)
      : requestHeader(type, handle, offset, length),
  );
  const v = new DataView((await readN(c, 16)).buffer);
  assert.deepEqual(v.getUint32(0), 0x67446698);
  assert.deepEqual(v.getBigUint64(8), BigInt(handle));
  const error = v.getUint32(4);
  if (type !== 0 || error !== 0) return { error };
  return { error, data: await readN(c, length) };
}

async function exists(p: string): Promise<boolean> {
  try {
    await Deno.lstat(p);
    return true;
  } catch {
    return false;
  }
}

function closeQuietly(c: Deno.Conn): void {
  try {
    c.close();
  } catch { /* closed by readToEnd's timeout */ }
}
