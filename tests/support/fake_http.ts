/**
 * Responses without a server, for tests of code that only reads them (errors, request layers).
 *
 * @module
 */

import type { HttpResponse } from "../../lib/registry/http.ts";

/** A response with `status`, `body` and `headers`, for code that only reads it. */
export function fakeResponse(
  status: number,
  body = "",
  headers: Record<string, string> = {},
): HttpResponse & { discarded: boolean } {
  const bytes = new TextEncoder().encode(body);
  const res = {
    status,
    headers: new Headers(headers),
    discarded: false,
    body: (async function* () {
      yield bytes;
    })(),
    bytes: () => Promise.resolve(bytes),
    text: () => Promise.resolve(body),
    discard: () => {
      res.discarded = true;
      return Promise.resolve();
    },
  };
  return res;
}
