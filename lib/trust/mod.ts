/**
 * Trust: containers-policy.json(5) policies and containers-registries.d(5) settings, sigstore
 * signatures in cosign's layout (simple-signing payloads, `sha256-<hex>.sig` attachments), and
 * the check a fetch runs before it stores anything.
 *
 * @module
 */

export * from "./policy.ts";
export * from "./registries_d.ts";
export * from "./signature.ts";
export * from "./verify.ts";
