/**
 * Loopback ports.
 *
 * @module
 */

/**
 * Returns a TCP port that was free on 127.0.0.1 a moment ago (bind port 0, close). Another
 * process may take it before the caller binds it; callers that can retry should.
 */
export function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}
