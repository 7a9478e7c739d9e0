/**
 * Talking to registries: the streaming HTTP client and its TLS settings, credentials (auth.json
 * and friends), Basic/Bearer challenges, the OCI distribution API client, login/logout.
 *
 * Private to this folder (not re-exported): `auth.ts`.
 *
 * @module
 */

export * from "./client.ts";
export * from "./credentials.ts";
export * from "./http.ts";
export * from "./login.ts";
export * from "./tls.ts";
