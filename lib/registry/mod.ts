/**
 * Talking to registries: the streaming HTTP client and its TLS settings, credentials (auth.json
 * and friends), Basic/Bearer challenges, the layers of one request (authentication, retries,
 * redirects), the OCI distribution API client, its typed errors, login/logout, mirrors and blocked
 * registries (containers-registries.conf).
 *
 * Private to this folder (not re-exported): `auth.ts`, `request.ts`.
 *
 * @module
 */

export * from "./client.ts";
export * from "./credentials.ts";
export * from "./errors.ts";
export * from "./http.ts";
export * from "./login.ts";
export * from "./registries_conf.ts";
export * from "./tls.ts";
