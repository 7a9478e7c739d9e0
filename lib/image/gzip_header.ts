/**
 * The gzip member header (RFC 1952): the one Python's `gzip` module writes, which sardinecake
 * 0.4 reads its disk's name and mtime from, and a parser that checks it. Private to lib/image/
 * except for what lib/image/mod.ts exports.
 *
 * @module
 */

import { fail } from "../util/errors.ts";

/** The fields of a gzip member header (RFC 1952). */
export interface GzipHeader {
  /** FLG byte (FTEXT 1, FHCRC 2, FEXTRA 4, FNAME 8, FCOMMENT 16). */
  flags: number;
  /** MTIME, seconds since the epoch (0 = none). */
  mtime: number;
  /** XFL byte. */
  xfl: number;
  /** OS byte (255 = unknown, which Python writes). */
  os: number;
  /** FNAME decoded as Latin-1, if present. */
  name?: string;
  /** Bytes from the magic up to the first deflate byte. */
  headerLength: number;
}

const FHCRC = 2, FEXTRA = 4, FNAME = 8, FCOMMENT = 16;

/** The FNAME bytes Python's `gzip` would store for `name` (see {@link GzipEncodeOptions}). */
function storedNameBytes(name: string): Uint8Array {
  const base = name.slice(name.lastIndexOf("/") + 1); // os.path.basename
  const bytes: number[] = [];
  for (const ch of base) {
    const cp = ch.codePointAt(0)!;
    if (cp > 0xff) {
      throw fail(
        "usage",
        `disk name '${name}' cannot be stored in a gzip header (only Latin-1 characters can)`,
        "rename the disk file, or use the zstd format",
      );
    }
    if (cp === 0) throw fail("usage", `disk name '${JSON.stringify(name)}' contains a NUL byte`);
    bytes.push(cp);
  }
  // Python strips '.gz' after encoding, case-sensitively.
  const n = bytes.length;
  if (n >= 3 && bytes[n - 3] === 0x2e && bytes[n - 2] === 0x67 && bytes[n - 1] === 0x7a) {
    bytes.length = n - 3;
  }
  return Uint8Array.from(bytes);
}

/** The header Python 3's `gzip.GzipFile(filename, "wb", 6, fileobj, mtime)` writes. */
export function pythonGzipHeader(storedName: string, mtime: number): Uint8Array {
  if (!Number.isInteger(mtime) || mtime < 0 || mtime > 0xffffffff) {
    throw fail("usage", `gzip mtime ${mtime} out of range (0 … 2^32-1 seconds)`);
  }
  const name = storedNameBytes(storedName);
  const h = new Uint8Array(10 + (name.length ? name.length + 1 : 0));
  h.set([0x1f, 0x8b, 8, name.length ? FNAME : 0]);
  new DataView(h.buffer).setUint32(4, mtime, true);
  h[8] = 0; // XFL: Python writes 2 only for level 9 and 4 for level 1
  h[9] = 0xff; // OS: Python writes 255 ("unknown")
  h.set(name, 10); // followed by the NUL already in place
  return h;
}

let crcTable: Uint32Array | undefined;

function crc32(bytes: Uint8Array): number {
  if (!crcTable) {
    crcTable = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      crcTable[n] = c >>> 0;
    }
  }
  let c = 0xffffffff;
  for (const b of bytes) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** Parses a header; `undefined` if `bytes` ends before the header does. */
export function tryParseGzipHeader(bytes: Uint8Array): GzipHeader | undefined {
  if (bytes.length >= 1 && bytes[0] !== 0x1f || bytes.length >= 2 && bytes[1] !== 0x8b) {
    throw fail("integrity", "not a gzip stream (bad magic)");
  }
  if (bytes.length >= 3 && bytes[2] !== 8) {
    throw fail("integrity", `unsupported gzip compression method ${bytes[2]}`);
  }
  if (bytes.length >= 4 && bytes[3] & 0xe0) {
    throw fail("integrity", `gzip header has reserved flag bits set (0x${bytes[3].toString(16)})`);
  }
  if (bytes.length < 10) return undefined;
  const flags = bytes[3];
  const mtime = new DataView(bytes.buffer, bytes.byteOffset, bytes.length).getUint32(4, true);
  let pos = 10;
  if (flags & FEXTRA) {
    if (bytes.length < pos + 2) return undefined;
    pos += 2 + (bytes[pos] | bytes[pos + 1] << 8);
    if (bytes.length < pos) return undefined;
  }
  let name: string | undefined;
  for (const flag of [FNAME, FCOMMENT]) {
    if (!(flags & flag)) continue;
    const end = bytes.indexOf(0, pos);
    if (end < 0) return undefined;
    if (flag === FNAME) name = String.fromCharCode(...bytes.subarray(pos, end)); // Latin-1
    pos = end + 1;
  }
  if (flags & FHCRC) {
    if (bytes.length < pos + 2) return undefined;
    const want = bytes[pos] | bytes[pos + 1] << 8;
    if ((crc32(bytes.subarray(0, pos)) & 0xffff) !== want) {
      throw fail("integrity", "gzip header CRC mismatch");
    }
    pos += 2;
  }
  return {
    flags,
    mtime,
    xfl: bytes[8],
    os: bytes[9],
    ...(name !== undefined ? { name } : {}),
    headerLength: pos,
  };
}

/**
 * Parses a gzip member header (RFC 1952) at the start of `bytes`, including FEXTRA, FNAME,
 * FCOMMENT and FHCRC (whose CRC is checked). Throws an `integrity` error on a malformed header
 * or if `bytes` ends inside it.
 */
export function parseGzipHeader(bytes: Uint8Array): GzipHeader {
  const h = tryParseGzipHeader(bytes);
  if (!h) throw fail("integrity", "truncated gzip header");
  return h;
}
