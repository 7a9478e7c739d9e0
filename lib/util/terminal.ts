/**
 * Reading user names and passwords from the terminal (passwords without echo) or from stdin.
 *
 * @module
 */

import { fail } from "./errors.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Reads one line from the terminal with a prompt on stderr; `secret` turns echo off. */
export async function promptLine(question: string, secret = false): Promise<string> {
  if (!Deno.stdin.isTerminal()) {
    throw fail(
      "usage",
      `cannot ask for ${question.replace(/:\s*$/, "").toLowerCase()}: stdin is not a terminal`,
      "pass it as an option, or use --password-stdin",
    );
  }
  Deno.stderr.writeSync(encoder.encode(question));
  if (secret) Deno.stdin.setRaw(true);
  const bytes: number[] = [];
  const buf = new Uint8Array(64);
  try {
    outer: for (;;) {
      const n = await Deno.stdin.read(buf);
      if (n === null) break;
      for (const b of buf.subarray(0, n)) {
        if (b === 13 || b === 10) break outer;
        if (b === 3) throw fail("interrupted", "interrupted");
        if (b === 127 || b === 8) bytes.pop();
        else bytes.push(b);
      }
    }
  } finally {
    if (secret) {
      Deno.stdin.setRaw(false);
      Deno.stderr.writeSync(encoder.encode("\n"));
    }
  }
  return decoder.decode(new Uint8Array(bytes));
}

/** Reads all of stdin (for `--password-stdin`), dropping one trailing newline. */
export async function readStdinSecret(): Promise<string> {
  const chunks: Uint8Array[] = [];
  for await (const c of Deno.stdin.readable) chunks.push(c);
  const all = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let off = 0;
  for (const c of chunks) {
    all.set(c, off);
    off += c.length;
  }
  return decoder.decode(all).replace(/\r?\n$/, "");
}
