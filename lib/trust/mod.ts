/**
 * Trust: containers-policy.json(5) policies and containers-registries.d(5) settings, sigstore
 * signatures in cosign's layout (simple-signing payloads, `sha256-<hex>.sig` attachments), the
 * check a fetch runs before it stores anything, and signing on push.
 *
 * @module
 */

export * from "./keys.ts";
export * from "./policy.ts";
export * from "./registries_d.ts";
export * from "./sign.ts";
export * from "./signature.ts";
export * from "./verify.ts";
