/**
 * `login` / `logout`: check credentials against a registry, then store or forget them.
 *
 * @module
 */

import { type Credentials, removeCredentials, saveCredentials } from "./credentials.ts";
import { fail } from "../util/errors.ts";
import type { TransportOptions } from "./http.ts";
import { parseRegistryHost } from "../oci/reference.ts";
import { createRegistryClient } from "./client.ts";
import type { RetryPolicy } from "../util/retry.ts";

/** Options for {@link login}. */
export interface LoginOptions extends TransportOptions {
  /** Where to store the credentials (default: the skopeo/podman auth file). */
  authfile?: string;
  /** Retries of the check; unset fields keep their defaults. */
  retry?: Partial<RetryPolicy>;
  signal?: AbortSignal;
}

/**
 * Verifies `credentials` against `registry` (a `GET /v2/` that must succeed with them, including
 * a token exchange where the registry uses tokens) and stores them. Nothing is stored on failure.
 * Returns the auth file written.
 */
export async function login(
  registry: string,
  credentials: Credentials,
  options: LoginOptions = {},
): Promise<string> {
  const host = parseRegistryHost(registry);
  if (!credentials.username) throw fail("usage", "a user name is required");
  const client = createRegistryClient(host, { ...options, credentials });
  try {
    await client.ping();
  } finally {
    client.close();
  }
  return await saveCredentials(host, credentials, options.authfile);
}

/** Forgets the stored credentials of `registry`, or of all registries. Returns whether any existed. */
export async function logout(
  registry: string | { all: true },
  options: { authfile?: string } = {},
): Promise<boolean> {
  const host = typeof registry === "string" ? parseRegistryHost(registry) : undefined;
  return await removeCredentials(host, options.authfile);
}
