/**
 * A read-only NBD server on a UNIX socket (the protocol of `NetworkBlockDevice/nbd`'s
 * `doc/proto.md`: fixed newstyle handshake, simple replies), serving several named exports, each
 * a {@link BlockSource}. QEMU's NBD client (`nbd+unix:///NAME?socket=PATH`, or a domain's
 * `<source protocol='nbd'>`) reads a lazily pulled disk through it.
 *
 * Replies go out in completion order, not request order (QEMU keeps up to 16 requests in flight),
 * and one client can never hurt another or the server: a source that throws costs that request
 * an `EIO`, a client that breaks the protocol is disconnected.
 *
 * @module
 */

import { debug, describeError, SardeError } from "../util/mod.ts";

/** Bytes an export serves, read on demand. */
export interface BlockSource {
  /** The export's size in bytes. */
  readonly size: number;
  /**
   * Exactly `length` bytes at `offset` (the server only asks within `size`). A throw (or a short
   * answer) becomes an I/O error for that one request.
   */
  read(offset: number, length: number): Promise<Uint8Array>;
}

/** Options of {@link serveNbd}. */
export interface NbdServerOptions {
  /**
   * Where to listen. Its directory is created (mode 0711) when missing and removed again by
   * `close()`; a stale socket at the path (a previous server's) is replaced.
   */
  socketPath: string;
  /** The exports by name (the `NAME` of `nbd+unix:///NAME?socket=…`; `""` is the default one). */
  exports: ReadonlyMap<string, BlockSource> | Record<string, BlockSource>;
  /**
   * Owner given to the socket. Default: `libvirt-qemu`'s uid and gid when running as root and
   * that user exists, else unchanged. `null` keeps the creator's.
   */
  socketOwner?: { uid: number; gid: number } | null;
  /** Mode of the socket. Default 0600 when it was given an owner, else 0666 (see the code). */
  socketMode?: number;
  /** Largest request accepted (default {@link NBD_MAX_REQUEST}); bigger ones get `EINVAL`. */
  maxRequest?: number;
  /**
   * A client that has not chosen an export this long after connecting is dropped (default
   * 10 000 ms; QEMU needs a few milliseconds), so idle connections cannot pile up.
   */
  handshakeTimeoutMs?: number;
}

/** A running server. */
export interface NbdServer {
  /** The socket's path. */
  readonly socketPath: string;
  /** Clients connected now (a lazy server exits once none has been for a while). */
  readonly clients: number;
  /** Stops listening, disconnects every client, removes the socket (and the directory made). */
  close(): Promise<void>;
  /** Same as {@link NbdServer.close}, for `await using`. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** Default cap on one request's length: 32 MiB, QEMU's own maximum NBD request. */
export const NBD_MAX_REQUEST = 32 * 1024 * 1024;

// Protocol constants (proto.md).
const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;

const FLAG_FIXED_NEWSTYLE = 1 << 0;
const FLAG_NO_ZEROES = 1 << 1;

const OPT_EXPORT_NAME = 1;
const OPT_ABORT = 2;
const OPT_LIST = 3;
const OPT_INFO = 6;
const OPT_GO = 7;

const REP_ACK = 1;
const REP_SERVER = 2;
const REP_INFO = 3;
const REP_ERR_UNSUP = 0x80000001;
const REP_ERR_INVALID = 0x80000003;
const REP_ERR_UNKNOWN = 0x80000006;

const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;

const FLAG_HAS_FLAGS = 1 << 0;
const FLAG_READ_ONLY = 1 << 1;
const FLAG_SEND_FLUSH = 1 << 2;
const FLAG_CAN_MULTI_CONN = 1 << 8; // read-only: every connection sees the same bytes
const TRANSMISSION_FLAGS = FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;

const CMD_READ = 0;
const CMD_WRITE = 1;
const CMD_DISC = 2;
const CMD_FLUSH = 3;
const CMD_TRIM = 4;
const CMD_WRITE_ZEROES = 6;

const EPERM = 1;
const EIO = 5;
const EINVAL = 22;

/** Option data beyond this is not a real client's (an export name is at most 4096 bytes). */
const MAX_OPTION = 16 * 1024;
/** Read bytes in flight per client before its next request waits (bounds memory per client). */
const MAX_INFLIGHT_BYTES = 64 * 1024 * 1024;

/** Per-client limits, from {@link NbdServerOptions}. */
interface Limits {
  maxRequest: number;
  handshakeTimeoutMs: number;
}

/** A client broke the protocol: drop it. */
class ProtocolError extends Error {}

/**
 * Starts a read-only NBD server on `options.socketPath`. Resolves once the socket accepts
 * connections with its final owner and mode; rejects with a {@link SardeError} when it cannot
 * listen there (another live server, a file in the way, no permission).
 */
export async function serveNbd(options: NbdServerOptions): Promise<NbdServer> {
  const exports = options.exports instanceof Map
    ? new Map(options.exports)
    : new Map(Object.entries(options.exports));
  const limits: Limits = {
    maxRequest: options.maxRequest ?? NBD_MAX_REQUEST,
    handshakeTimeoutMs: options.handshakeTimeoutMs ?? 10_000,
  };
  const path = options.socketPath;
  const dir = path.slice(0, path.lastIndexOf("/")) || "/";

  const madeDir = await makeSocketDir(dir);
  let listener: Deno.UnixListener | undefined;
  try {
    await removeStaleSocket(path);
    listener = Deno.listen({ transport: "unix", path });
    await setSocketAccess(path, options);
  } catch (err) {
    // only what this call made: never a file that was at the path before
    if (listener) {
      listener.close();
      await Deno.remove(path).catch(() => {});
    }
    if (madeDir) await Deno.remove(dir).catch(() => {});
    if (err instanceof SardeError) throw err;
    throw new SardeError("io", `cannot serve NBD on ${path}: ${describeError(err)}`, {
      cause: err,
    });
  }

  const conns = new Set<Deno.UnixConn>();
  const handlers = new Set<Promise<void>>();
  let closing: Promise<void> | undefined;
  const accepting = (async () => {
    for (;;) {
      let conn: Deno.UnixConn;
      try {
        conn = await listener.accept();
      } catch (err) {
        if (
          closing || err instanceof Deno.errors.BadResource ||
          err instanceof Deno.errors.Interrupted
        ) {
          return; // closed
        }
        // EMFILE and friends: keep serving the clients we have, try again shortly
        debug(`nbd: accept failed: ${describeError(err)}`);
        await new Promise((r) => setTimeout(r, 100));
        continue;
      }
      conns.add(conn);
      const h = serveClient(conn, exports, limits)
        .catch((err) => debug(`nbd: client dropped: ${describeError(err)}`))
        .finally(() => {
          conns.delete(conn);
          handlers.delete(h);
          try {
            conn.close();
          } catch { /* already closed */ }
        });
      handlers.add(h);
    }
  })();

  const close = () =>
    closing ??= (async () => {
      try {
        listener.close();
      } catch { /* already closed */ }
      await accepting;
      for (const c of conns) {
        try {
          c.close();
        } catch { /* already closed */ }
      }
      await Promise.allSettled([...handlers]);
      await Deno.remove(path).catch(() => {});
      if (madeDir) await Deno.remove(dir).catch(() => {});
    })();
  return {
    socketPath: path,
    get clients() {
      return conns.size;
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}

/** Creates the socket's directory (0711: others may reach a known path, not list it). */
async function makeSocketDir(dir: string): Promise<boolean> {
  try {
    await Deno.mkdir(dir, { mode: 0o711 });
  } catch (err) {
    if (err instanceof Deno.errors.AlreadyExists) return false;
    throw err;
  }
  await Deno.chmod(dir, 0o711); // mkdir's mode goes through the umask
  return true;
}

/**
 * Removes the socket a killed server left behind (QEMU reconnects to the same path when sarde
 * restarts), but not one a live server still answers on, nor anything that is not a socket.
 */
async function removeStaleSocket(path: string): Promise<void> {
  let st: Deno.FileInfo;
  try {
    st = await Deno.lstat(path);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return;
    throw err;
  }
  if (!st.isSocket) return; // listen fails with "address in use"
  let live: Deno.UnixConn | undefined;
  try {
    live = await Deno.connect({ transport: "unix", path });
  } catch { /* nobody listens: stale */ }
  if (live) {
    live.close();
    throw new SardeError("io", `another server is listening on ${path}`);
  }
  await Deno.remove(path);
}

/**
 * QEMU under `qemu:///system` runs as `libvirt-qemu`, and libvirt does not relabel (chown) network
 * disk sources as it does files: the socket must already be reachable by that user, or the domain
 * fails to start with "Permission denied". As root we give the socket to that user and keep it
 * 0600, so no other local user can read the disk. Without root we cannot chown; then the socket is
 * 0666 inside the 0711 directory made for it: reachable by a client that knows the path, never
 * listed, and read-only whoever connects.
 */
async function setSocketAccess(path: string, options: NbdServerOptions): Promise<void> {
  const owner = options.socketOwner === undefined ? await qemuOwner() : options.socketOwner;
  if (owner) await Deno.chown(path, owner.uid, owner.gid);
  await Deno.chmod(path, options.socketMode ?? (owner ? 0o600 : 0o666));
}

/** `libvirt-qemu`'s uid and gid when we are root and the user exists (Debian's libvirt). */
async function qemuOwner(): Promise<{ uid: number; gid: number } | null> {
  if (Deno.uid() !== 0) return null;
  let passwd: string;
  try {
    passwd = await Deno.readTextFile("/etc/passwd");
  } catch {
    return null;
  }
  for (const line of passwd.split("\n")) {
    const f = line.split(":");
    if (f[0] === "libvirt-qemu" && f.length >= 4) return { uid: Number(f[2]), gid: Number(f[3]) };
  }
  return null;
}

/** Buffered exact reads from a connection; `null` at a clean end of stream. */
function reader(conn: Deno.UnixConn) {
  let buf = new Uint8Array(64 * 1024);
  let start = 0;
  let end = 0;
  return async function readExact(n: number): Promise<Uint8Array | null> {
    if (end - start < n) {
      if (buf.length - start < n) {
        const grown = new Uint8Array(Math.max(buf.length, n));
        grown.set(buf.subarray(start, end));
        end -= start;
        start = 0;
        buf = grown;
      }
      while (end - start < n) {
        const got = await conn.read(buf.subarray(end));
        if (got === null) {
          if (end === start) return null;
          throw new ProtocolError("connection closed mid-message");
        }
        end += got;
      }
    }
    const out = buf.slice(start, start + n);
    start += n;
    if (start === end) start = end = 0;
    return out;
  };
}

/** Serialised writes: replies finishing together must not interleave on the socket. */
function writer(conn: Deno.UnixConn) {
  let chain: Promise<void> = Promise.resolve();
  let failed: unknown;
  const send = (data: Uint8Array) => {
    chain = chain.then(async () => {
      if (failed) return;
      try {
        for (let off = 0; off < data.length;) off += await conn.write(data.subarray(off));
      } catch (err) {
        failed = err;
      }
    });
    return chain;
  };
  return {
    send,
    /** Resolves when everything sent so far is written; to the write error if one failed. */
    drained: () => chain.then(() => failed),
    /** Whether a write failed (the client went away). */
    broken: () => failed !== undefined,
  };
}

/** Handshake, then transmission, for one client. Throws (to be logged) when it misbehaves. */
async function serveClient(
  conn: Deno.UnixConn,
  exports: ReadonlyMap<string, BlockSource>,
  limits: Limits,
): Promise<void> {
  const read = reader(conn);
  const out = writer(conn);
  const timer = setTimeout(() => {
    debug("nbd: client dropped: no export chosen in time");
    try {
      conn.close(); // the pending read fails, which ends this client
    } catch { /* already closed */ }
  }, limits.handshakeTimeoutMs);
  let source: BlockSource | undefined;
  try {
    source = await handshake(read, out, exports, limits);
  } finally {
    clearTimeout(timer);
  }
  if (source) await transmit(read, out, source, limits.maxRequest);
}

/** Greeting, client flags, options; the chosen export, or `undefined` when the client left. */
async function handshake(
  read: (n: number) => Promise<Uint8Array | null>,
  out: ReturnType<typeof writer>,
  exports: ReadonlyMap<string, BlockSource>,
  limits: Limits,
): Promise<BlockSource | undefined> {
  const greeting = new DataView(new ArrayBuffer(18));
  greeting.setBigUint64(0, NBDMAGIC);
  greeting.setBigUint64(8, IHAVEOPT);
  greeting.setUint16(16, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
  out.send(new Uint8Array(greeting.buffer));

  const cflags = await read(4);
  if (!cflags) return undefined;
  const clientFlags = view(cflags).getUint32(0);
  if (clientFlags & ~(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) {
    throw new ProtocolError(`unknown client flags ${clientFlags}`);
  }
  const noZeroes = (clientFlags & FLAG_NO_ZEROES) !== 0;
  const source = await negotiate(read, out.send, exports, noZeroes, limits.maxRequest);
  if (!source) await out.drained();
  return source;
}

/** The option haggling phase; the chosen export, or `undefined` when the client left. */
async function negotiate(
  read: (n: number) => Promise<Uint8Array | null>,
  send: (b: Uint8Array) => Promise<void>,
  exports: ReadonlyMap<string, BlockSource>,
  noZeroes: boolean,
  maxRequest: number,
): Promise<BlockSource | undefined> {
  const reply = (opt: number, type: number, data = new Uint8Array(0)) => {
    const b = new Uint8Array(20 + data.length);
    const v = view(b);
    v.setBigUint64(0, REPLY_MAGIC);
    v.setUint32(8, opt);
    v.setUint32(12, type);
    v.setUint32(16, data.length);
    b.set(data, 20);
    return send(b);
  };
  const decoder = new TextDecoder("utf-8", { fatal: true });
  const encoder = new TextEncoder();
  for (;;) {
    const head = await read(16);
    if (!head) return undefined;
    const hv = view(head);
    if (hv.getBigUint64(0) !== IHAVEOPT) throw new ProtocolError("bad option magic");
    const opt = hv.getUint32(8);
    const len = hv.getUint32(12);
    if (len > MAX_OPTION) throw new ProtocolError(`option ${opt} of ${len} bytes`);
    const data = len ? await read(len) : new Uint8Array(0);
    if (!data) return undefined;
    const name = (bytes: Uint8Array) => {
      try {
        return decoder.decode(bytes);
      } catch {
        return undefined;
      }
    };

    switch (opt) {
      case OPT_EXPORT_NAME: {
        // No way to answer an error here: the protocol says to hang up on an unknown name.
        const n = name(data);
        const src = n === undefined ? undefined : exports.get(n);
        if (!src) throw new ProtocolError(`unknown export ${JSON.stringify(n)}`);
        const b = new Uint8Array(noZeroes ? 10 : 134);
        view(b).setBigUint64(0, BigInt(src.size));
        view(b).setUint16(8, TRANSMISSION_FLAGS);
        await send(b);
        return src;
      }
      case OPT_ABORT:
        await reply(opt, REP_ACK);
        return undefined;
      case OPT_LIST: {
        if (len !== 0) {
          await reply(opt, REP_ERR_INVALID);
          break;
        }
        for (const n of exports.keys()) {
          const e = encoder.encode(n);
          const b = new Uint8Array(4 + e.length);
          view(b).setUint32(0, e.length);
          b.set(e, 4);
          await reply(opt, REP_SERVER, b);
        }
        await reply(opt, REP_ACK);
        break;
      }
      case OPT_INFO:
      case OPT_GO: {
        const dv = view(data);
        const nlen = len >= 4 ? dv.getUint32(0) : -1;
        if (nlen < 0 || 4 + nlen + 2 > len) {
          await reply(opt, REP_ERR_INVALID);
          break;
        }
        const nreq = dv.getUint16(4 + nlen);
        if (4 + nlen + 2 + 2 * nreq !== len) {
          await reply(opt, REP_ERR_INVALID);
          break;
        }
        const n = name(data.subarray(4, 4 + nlen));
        const src = n === undefined ? undefined : exports.get(n);
        if (!src) {
          await reply(opt, REP_ERR_UNKNOWN, encoder.encode(`no export named ${JSON.stringify(n)}`));
          break;
        }
        const info = new Uint8Array(12);
        view(info).setUint16(0, INFO_EXPORT);
        view(info).setBigUint64(2, BigInt(src.size));
        view(info).setUint16(10, TRANSMISSION_FLAGS);
        await reply(opt, REP_INFO, info);
        const wants = Array.from({ length: nreq }, (_, i) => dv.getUint16(4 + nlen + 2 + 2 * i));
        if (wants.includes(INFO_BLOCK_SIZE)) {
          // Any alignment works (minimum 1); 4 KiB is what disks prefer; the maximum is our cap,
          // so QEMU splits bigger reads itself instead of getting EINVAL.
          const bs = new Uint8Array(14);
          view(bs).setUint16(0, INFO_BLOCK_SIZE);
          view(bs).setUint32(2, 1);
          view(bs).setUint32(6, 4096);
          view(bs).setUint32(10, Math.min(maxRequest, 0xffffffff));
          await reply(opt, REP_INFO, bs);
        }
        await reply(opt, REP_ACK);
        if (opt === OPT_GO) return src;
        break;
      }
      default:
        // STARTTLS, STRUCTURED_REPLY, meta contexts, extended headers…: not offered, simple
        // replies are all QEMU needs for reads.
        await reply(opt, REP_ERR_UNSUP);
    }
  }
}

/** The transmission phase: requests in, replies out as each read completes. */
async function transmit(
  read: (n: number) => Promise<Uint8Array | null>,
  out: ReturnType<typeof writer>,
  source: BlockSource,
  maxRequest: number,
): Promise<void> {
  const pending = new Set<Promise<void>>();
  let inflight = 0;
  const replyHeader = (handle: Uint8Array, error: number) => {
    const b = new Uint8Array(16);
    view(b).setUint32(0, SIMPLE_REPLY_MAGIC);
    view(b).setUint32(4, error);
    b.set(handle, 8);
    return b;
  };
  const answer = (handle: Uint8Array, error: number) => out.send(replyHeader(handle, error));

  try {
    for (;;) {
      const req = await read(28);
      if (!req) return;
      const rv = view(req);
      if (rv.getUint32(0) !== REQUEST_MAGIC) throw new ProtocolError("bad request magic");
      const type = rv.getUint16(6);
      const handle = req.slice(8, 16);
      const offset = Number(rv.getBigUint64(16));
      const length = rv.getUint32(24);

      switch (type) {
        case CMD_READ: {
          if (length === 0 || length > maxRequest || offset + length > source.size) {
            answer(handle, EINVAL);
            break;
          }
          // Backpressure: stop reading requests while this client has too much in flight.
          while (inflight > 0 && inflight + length > MAX_INFLIGHT_BYTES) {
            await Promise.race(pending);
          }
          inflight += length;
          const p = serveRead(source, offset, length).then((data) => {
            if (!data) return answer(handle, EIO);
            const b = new Uint8Array(16 + data.length);
            b.set(replyHeader(handle, 0));
            b.set(data, 16);
            return out.send(b);
          }).finally(() => {
            inflight -= length;
            pending.delete(p);
          });
          pending.add(p);
          break;
        }
        case CMD_WRITE: {
          // The payload follows the header; it must be consumed to stay in step with the client.
          if (length > maxRequest) throw new ProtocolError(`write of ${length} bytes`);
          if (length && !(await read(length))) return;
          answer(handle, EPERM);
          break;
        }
        case CMD_TRIM:
        case CMD_WRITE_ZEROES:
          answer(handle, EPERM);
          break;
        case CMD_FLUSH:
          answer(handle, 0); // nothing is ever written, so nothing to flush
          break;
        case CMD_DISC:
          return;
        default:
          answer(handle, EINVAL);
      }
      if (out.broken()) return; // the client went away while we answered
    }
  } finally {
    // Send what is being read before hanging up (DISC, or the client half-closed).
    await Promise.allSettled([...pending]);
    await out.drained();
  }
}

async function serveRead(
  source: BlockSource,
  offset: number,
  length: number,
): Promise<Uint8Array | undefined> {
  try {
    const data = await source.read(offset, length);
    if (data.length === length) return data;
    debug(`nbd: source answered ${data.length} bytes for ${length} at ${offset}`);
  } catch (err) {
    debug(`nbd: read of ${length} bytes at ${offset} failed: ${describeError(err)}`);
  }
  return undefined;
}

function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}
