/**
 * Demand reads before the background download (docs/lazy-pull.md, "Demand reads"): `fetchImage`
 * with a `gate` pauses between body reads while a lazy pull's demand read holds the gate, so the
 * read gets a shared slow link to itself. Real registry on 127.0.0.1, a proxy that paces all blob
 * bodies together (one link) and counts them, ranged ones apart.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { parseReference } from "../lib/oci/reference.ts";
import { createRegistryClient } from "../lib/registry/client.ts";
import { fetchImage } from "../lib/transfer/transfer.ts";
import { createPriorityGate } from "../lib/util/gate.ts";
import * as api from "../mod.ts";
import { makeImage, tempDir, until } from "./support/images.ts";
import { startThrottledProxy } from "./support/proxy.ts";
import { startRegistry } from "./support/registry.ts";

const opts = { sanitizeResources: false, sanitizeOps: false };
const MiB = 1 << 20;

Deno.test({
  name: "fetchImage's gate: a held gate leaves a shared slow link to a demand read",
  ...opts,
  async fn() {
    await using reg = await startRegistry("plain");
    const work = await tempDir("lazy-gate");
    try {
      const ref = `${reg.host}/gate/img:v1`;
      const img = await makeImage(join(work, "src"), ref, [
        { size: 16 * MiB, kind: "random" },
        { size: 16 * MiB, kind: "random" },
        { size: 16 * MiB, kind: "random" },
      ]);
      await api.push(ref, { ocidir: join(work, "src") });
      const demandBlob = img.layers[img.layers.length - 1];
      const total = img.layers.reduce((n, l) => n + l.size, 0);
      const demandBytes = 2 * MiB;

      /**
       * Background bytes moved while one demand read ran, with and without the gate; and those
       * moved after the gate was held before the download stopped (buffers filling).
       */
      const during = async (gated: boolean) => {
        await using proxy = await startThrottledProxy({ url: `http://${reg.host}` }, {
          bytesPerSecond: 4 * MiB,
          shared: true,
        });
        const background = () => proxy.blobBytes().all - proxy.blobBytes().ranged;
        const gate = createPriorityGate({ graceMs: 100, maxWaitMs: 60_000 });
        const stop = new AbortController();
        const fetching = fetchImage(parseReference(`${proxy.host}/gate/img:v1`), {
          ocidir: join(work, gated ? "gated" : "free"),
          signal: stop.signal,
          ...(gated ? { gate: gate.wait } : {}),
        });
        fetching.catch(() => {});
        await until(() => background() >= MiB, "the background download runs", 60_000);
        const client = createRegistryClient(proxy.host);
        try {
          const release = gate.hold();
          // A paused download stops once the socket buffers on its way are full (TCP flow
          // control): wait until nothing moves for half a second.
          const held = background();
          let last = -1;
          if (gated) {
            await until(
              async () => {
                const now = background();
                await new Promise((r) => setTimeout(r, 500));
                return now === last || (last = now, false);
              },
              "the paused download stops",
              30_000,
            );
          }
          const buffered = background() - held;
          const before = background();
          const got = await client.readBlob("gate/img", demandBlob, {
            offset: 0,
            length: demandBytes,
          });
          const moved = background() - before;
          release();
          assert.equal(got.length, demandBytes);
          assert.ok(background() < total, "the download ended before the read did");
          stop.abort();
          await fetching.catch(() => {});
          return { moved, buffered };
        } finally {
          client.close();
        }
      };

      // Without the gate, three blob downloads share the link with the read: most of it.
      const free = (await during(false)).moved;
      const { moved: gated, buffered } = await during(true);
      const mib = (n: number) => `${(n / MiB).toFixed(2)} MiB`;
      console.log(
        `background bytes during a ${mib(demandBytes)} demand read: ${mib(free)} without the ` +
          `gate, ${mib(gated)} with it (${mib(buffered)} went into buffers after it was held)`,
      );
      assert.ok(free >= demandBytes, `the test's link is not shared: ${free} bytes`);
      assert.ok(gated <= demandBytes / 8, `the paused download moved ${gated} bytes`);
    } finally {
      await Deno.remove(work, { recursive: true }).catch(() => {});
    }
  },
});
