/**
 * `RegistryClient.readBlob`: byte ranges of a blob read from a real registry (`docker-registry`
 * on 127.0.0.1), with the registry trouble a lazy pull meets on the way: cut connections, 5xx,
 * servers that ignore `Range`, and ranges or sizes that do not fit the blob.
 */
import assert from "node:assert/strict";
import { digestOf } from "../lib/oci/digest.ts";
import type { Descriptor } from "../lib/oci/types.ts";
import {
  createRegistryClient,
  FULL_READ_LIMIT,
  type RegistryClient,
} from "../lib/registry/client.ts";
import { SardeError } from "../lib/util/errors.ts";
import { assertSameBytes } from "./support/bytes.ts";
import { startFaultyProxy, startRegistry, type TestRegistry } from "./support/registry.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };
const FAST = { baseDelayMs: 20, maxElapsedMs: 10_000 };
const REPO = "lazy/read";

/** Random bytes (crypto.getRandomValues fills at most 64 KiB at a time). */
function randomBytes(size: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(size);
  for (let pos = 0; pos < size; pos += 65536) {
    crypto.getRandomValues(out.subarray(pos, Math.min(size, pos + 65536)));
  }
  return out;
}

/** Uploads `data` to `REPO` of `reg`; its descriptor. */
async function upload(reg: TestRegistry, data: Uint8Array): Promise<Descriptor> {
  const blob = { mediaType: "application/octet-stream", digest: digestOf(data), size: data.length };
  const client = createRegistryClient(reg.host);
  try {
    await client.uploadBlob(REPO, blob, async function* (offset, length) {
      yield data.subarray(offset, offset + length);
    });
  } finally {
    client.close();
  }
  return blob;
}

async function withClient<T>(host: string, fn: (c: RegistryClient) => Promise<T>): Promise<T> {
  const client = createRegistryClient(host, { retry: FAST });
  try {
    return await fn(client);
  } finally {
    client.close();
  }
}

/** The GETs of blobs a proxy forwarded. */
const blobGets = (p: { requests(): { method: string; path: string }[] }) =>
  p.requests().filter((r) => r.method === "GET" && r.path.includes("/blobs/sha256:")).length;

Deno.test({
  name: "readBlob: ranges at the start, middle and end, and the whole blob",
  ...opts,
  fn: async () => {
    await using reg = await startRegistry("plain");
    const data = randomBytes(3 << 20);
    const blob = await upload(reg, data);
    await withClient(reg.host, async (c) => {
      for (const [offset, length] of [[0, 1000], [1 << 20, 777_777], [data.length - 4097, 4097]]) {
        const got = await c.readBlob(REPO, blob, { offset, length });
        assertSameBytes(got, data.subarray(offset, offset + length), `bytes ${offset}+${length}`);
      }
      assertSameBytes(await c.readBlob(REPO, blob), data);
      assert.equal((await c.readBlob(REPO, blob, { offset: 5, length: 0 })).length, 0);
    });
  },
});

Deno.test({
  name: "readBlob: a range beyond the blob, a short blob, other bytes or another blob are errors",
  ...opts,
  fn: async () => {
    await using reg = await startRegistry("plain");
    const data = randomBytes(100_000);
    const blob = await upload(reg, data);
    await withClient(reg.host, async (c) => {
      await assert.rejects(
        c.readBlob(REPO, blob, { offset: 99_000, length: 2000 }),
        (e) => e instanceof SardeError && e.kind === "usage" && /not within/.test(e.message),
      );
      // A manifest claiming more bytes than the registry has: the registry answers 416.
      const longer = { ...blob, size: 200_000 };
      await assert.rejects(
        c.readBlob(REPO, longer, { offset: 150_000, length: 1000 }),
        (e) => e instanceof SardeError && e.kind === "integrity" && /fewer than/.test(e.message),
      );
    });
    // Bytes other than the ones asked for, and a whole blob that is not the one asked for.
    await using shifted = await startFaultyProxy({ url: reg.url }, {
      kind: "rewrite",
      requests: "blob-get",
      headers: { "content-range": `bytes 0-999/${blob.size}` },
    });
    await withClient(shifted.host, async (c) => {
      await assert.rejects(
        c.readBlob(REPO, blob, { offset: 1000, length: 1000 }),
        (e) => e instanceof SardeError && /sent bytes 0-999/.test(e.message),
      );
    });
    await using corrupting = await startFaultyProxy({ url: reg.url }, { kind: "corrupt-blob" });
    await withClient(corrupting.host, async (c) => {
      await assert.rejects(
        c.readBlob(REPO, blob),
        (e) =>
          e instanceof SardeError && e.kind === "integrity" && /another digest/.test(e.message),
      );
    });
  },
});

Deno.test({
  name: "readBlob: a connection cut mid-body resumes where it stopped; a 503 is retried",
  ...opts,
  fn: async () => {
    await using reg = await startRegistry("plain");
    const data = randomBytes(2 << 20);
    const blob = await upload(reg, data);
    await using cut = await startFaultyProxy({ url: reg.url }, {
      kind: "cut-blob",
      afterBytes: 100_000,
      times: 2,
    });
    const range = { offset: 300_000, length: 1 << 20 };
    const got = await withClient(cut.host, (c) => c.readBlob(REPO, blob, range));
    assert.equal(cut.faults(), 2);
    assert.equal(blobGets(cut), 3, "two cuts, then the rest");
    assertSameBytes(got, data.subarray(range.offset, range.offset + range.length));

    await using busy = await startFaultyProxy({ url: reg.url }, {
      kind: "status",
      status: 503,
      times: 3,
      requests: "blob-get",
    });
    const again = await withClient(busy.host, (c) => c.readBlob(REPO, blob, range));
    assert.equal(busy.faults(), 3);
    assertSameBytes(again, data.subarray(range.offset, range.offset + range.length));
  },
});

Deno.test({
  name: "readBlob: a server ignoring Range is cut to size for small blobs, refused for large",
  ...opts,
  fn: async () => {
    await using reg = await startRegistry("plain");
    const small = randomBytes(1 << 20);
    const large = randomBytes(FULL_READ_LIMIT + 1);
    const smallBlob = await upload(reg, small);
    const largeBlob = await upload(reg, large);
    await using proxy = await startFaultyProxy({ url: reg.url }, { kind: "ignore-range" });
    await withClient(proxy.host, async (c) => {
      const got = await c.readBlob(REPO, smallBlob, { offset: 500_000, length: 1000 });
      assertSameBytes(got, small.subarray(500_000, 501_000));
      assert.equal(proxy.faults(), 1, "the Range header was dropped");
      await assert.rejects(
        c.readBlob(REPO, largeBlob, { offset: 0, length: 1000 }),
        (e) => e instanceof SardeError && /ignores Range/.test(e.message),
      );
    });
  },
});
