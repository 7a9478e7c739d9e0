/**
 * Sigstore (cosign) signing keys: ECDSA P-256 key pairs in the files `cosign generate-key-pair`
 * and `skopeo generate-sigstore-key` write, and that `cosign sign --key` and
 * `skopeo copy --sign-by-sigstore-private-key` read.
 *
 * The private key file is PEM `ENCRYPTED SIGSTORE PRIVATE KEY` (cosign before 2.0:
 * `ENCRYPTED COSIGN PRIVATE KEY`) around the JSON of go-securesystemslib's `encrypted` package:
 * a 32-byte key is derived from the passphrase with scrypt, and the PKCS#8 DER of the private key
 * is sealed with it in a NaCl secretbox (XSalsa20-Poly1305). The public key is a plain PKIX
 * `PUBLIC KEY` PEM, which openssl and every policy.json `keyPath` read.
 *
 * @module
 */

import {
  createPrivateKey,
  createPublicKey,
  generateKeyPairSync,
  type KeyObject,
  randomBytes,
  scrypt,
} from "node:crypto";
import { Buffer } from "node:buffer";
import { xsalsa20poly1305 } from "@noble/ciphers/salsa.js";
import { fail } from "../util/errors.ts";
import { osReason } from "../util/fsutil.ts";

/** The PEM type cosign 2 and containers/image write for encrypted private keys. */
export const SIGSTORE_PRIVATE_KEY_PEM = "ENCRYPTED SIGSTORE PRIVATE KEY";
/** The PEM type of cosign before 2.0, still read by everyone. */
const COSIGN_PRIVATE_KEY_PEM = "ENCRYPTED COSIGN PRIVATE KEY";

/** scrypt parameters go-securesystemslib writes by default (its "legacy" strength, cosign's). */
const DEFAULT_SCRYPT = { N: 32768, r: 8, p: 1 };
/**
 * The parameter sets go-securesystemslib accepts (legacy, standard, OWASP): anything else is
 * refused, as there, so that a crafted key file cannot make a decryption take gigabytes.
 */
const ACCEPTED_SCRYPT = [32768, 65536, 131072].map((N) => ({ N, r: 8, p: 1 }));
const SALT_BYTES = 32;
const NONCE_BYTES = 24;
const KEY_BYTES = 32;

/** A key pair as the two files hold it. */
export interface SigstoreKeyPair {
  /** PEM `ENCRYPTED SIGSTORE PRIVATE KEY`: what goes into `P.key` (mode 0600). */
  privatePem: string;
  /** PEM `PUBLIC KEY` (PKIX): what goes into `P.pub`, for policy.json's `keyPath`. */
  publicPem: string;
}

/** The JSON inside the PEM, field for field as go-securesystemslib marshals it. */
interface EncryptedKey {
  kdf: { name: string; params: { N: number; r: number; p: number }; salt: string };
  cipher: { name: string; nonce: string };
  ciphertext: string;
}

function deriveKey(
  passphrase: string,
  salt: Uint8Array,
  params: { N: number; r: number; p: number },
): Promise<Uint8Array> {
  // scrypt needs 128·N·r bytes; node's default cap (32 MiB) is exactly what N=32768 needs and
  // too little for the stronger sets.
  const maxmem = 256 * params.N * params.r;
  return new Promise((resolve, reject) =>
    scrypt(
      new TextEncoder().encode(passphrase),
      salt,
      KEY_BYTES,
      { ...params, maxmem },
      (err, key) => err ? reject(err) : resolve(new Uint8Array(key)),
    )
  );
}

/**
 * Seals `plaintext` with `passphrase` as go-securesystemslib's `encrypted.Encrypt` does: its JSON
 * (scrypt N=32768, r=8, p=1, random salt and nonce).
 */
export async function encryptWithPassphrase(
  plaintext: Uint8Array,
  passphrase: string,
): Promise<string> {
  const salt = new Uint8Array(randomBytes(SALT_BYTES));
  const nonce = new Uint8Array(randomBytes(NONCE_BYTES));
  const key = await deriveKey(passphrase, salt, DEFAULT_SCRYPT);
  const sealed = xsalsa20poly1305(key, nonce).encrypt(plaintext);
  const data: EncryptedKey = {
    kdf: { name: "scrypt", params: DEFAULT_SCRYPT, salt: base64(salt) },
    cipher: { name: "nacl/secretbox", nonce: base64(nonce) },
    ciphertext: base64(sealed),
  };
  return JSON.stringify(data);
}

/**
 * Opens go-securesystemslib's `encrypted` JSON with `passphrase`. A wrong passphrase (or a
 * tampered file: the secretbox cannot tell them apart) is a one-line usage error naming `what`.
 */
export async function decryptWithPassphrase(
  json: string,
  passphrase: string,
  what = "the private key",
): Promise<Uint8Array> {
  const data = parseEncrypted(json, what);
  const params = data.kdf.params;
  if (!ACCEPTED_SCRYPT.some((a) => a.N === params.N && a.r === params.r && a.p === params.p)) {
    throw fail(
      "usage",
      `${what}: unsupported scrypt parameters N=${params.N} r=${params.r} p=${params.p}`,
    );
  }
  const salt = unbase64(data.kdf.salt, `${what}: kdf salt`);
  const nonce = unbase64(data.cipher.nonce, `${what}: cipher nonce`);
  if (nonce.length !== NONCE_BYTES) throw fail("usage", `${what}: the nonce is not 24 bytes`);
  const sealed = unbase64(data.ciphertext, `${what}: ciphertext`);
  const key = await deriveKey(passphrase, salt, params);
  try {
    return xsalsa20poly1305(key, nonce).decrypt(sealed);
  } catch {
    throw fail(
      "usage",
      `cannot decrypt ${what}: wrong passphrase (or the file was altered)`,
      "check the passphrase file (its first line is the passphrase)",
    );
  }
}

function parseEncrypted(json: string, what: string): EncryptedKey {
  let d: EncryptedKey;
  try {
    d = JSON.parse(json);
  } catch {
    throw fail("usage", `${what} is not an encrypted sigstore key (its content is not JSON)`);
  }
  const ok = d?.kdf?.name === "scrypt" && typeof d.kdf.salt === "string" &&
    [d.kdf.params?.N, d.kdf.params?.r, d.kdf.params?.p].every(Number.isInteger) &&
    d.cipher?.name === "nacl/secretbox" && typeof d.cipher.nonce === "string" &&
    typeof d.ciphertext === "string";
  if (!ok) {
    throw fail(
      "usage",
      `${what} is not an encrypted sigstore key (want kdf scrypt and cipher nacl/secretbox)`,
    );
  }
  return d;
}

/**
 * A new ECDSA P-256 key pair, the private key encrypted with `passphrase` in cosign's format.
 */
export async function generateSigstoreKey(passphrase: string): Promise<SigstoreKeyPair> {
  const { privateKey, publicKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const pkcs8 = new Uint8Array(privateKey.export({ type: "pkcs8", format: "der" }));
  const sealed = await encryptWithPassphrase(pkcs8, passphrase);
  return {
    privatePem: pem(SIGSTORE_PRIVATE_KEY_PEM, new TextEncoder().encode(sealed)),
    publicPem: publicKey.export({ type: "spki", format: "pem" }) as string,
  };
}

/**
 * Reads an encrypted sigstore private key file's content (either PEM type) with `passphrase`.
 * `what` names the file in errors. Only ECDSA P-256 keys are accepted: the simple-signing
 * signatures of cosign and containers/image are ECDSA over SHA-256.
 */
export async function readSigstorePrivateKey(
  text: string,
  passphrase: string,
  what = "the private key",
): Promise<KeyObject> {
  const block = /-----BEGIN ([A-Z ]+)-----\r?\n([A-Za-z0-9+/=\r\n]*?)-----END \1-----/.exec(text);
  if (!block) throw fail("usage", `${what} is not a PEM file`);
  if (block[1] !== SIGSTORE_PRIVATE_KEY_PEM && block[1] !== COSIGN_PRIVATE_KEY_PEM) {
    throw fail(
      "usage",
      `${what} is a PEM ${block[1]}, not an ${SIGSTORE_PRIVATE_KEY_PEM}`,
      "make one with `sarde generate-sigstore-key` or `cosign generate-key-pair`",
    );
  }
  const json = new TextDecoder().decode(unbase64(block[2].replace(/\s/g, ""), what));
  const der = await decryptWithPassphrase(json, passphrase, what);
  let key: KeyObject;
  try {
    key = createPrivateKey({ key: Buffer.from(der), format: "der", type: "pkcs8" });
  } catch {
    throw fail("usage", `${what} does not hold a PKCS#8 private key`);
  }
  if (key.asymmetricKeyType !== "ec" || key.asymmetricKeyDetails?.namedCurve !== "prime256v1") {
    throw fail("usage", `${what} is not an ECDSA P-256 key (the only kind sarde signs with)`);
  }
  return key;
}

/** The PKIX `PUBLIC KEY` PEM of a private key. */
export function publicKeyPem(privateKey: KeyObject): string {
  return createPublicKey(privateKey).export({ type: "spki", format: "pem" }) as string;
}

/** PEM with 64-character lines, as Go's encoding/pem writes it. */
function pem(type: string, bytes: Uint8Array): string {
  const b64 = base64(bytes).replace(/.{64}/g, "$&\n").replace(/\n$/, "");
  return `-----BEGIN ${type}-----\n${b64}\n-----END ${type}-----\n`;
}

function base64(bytes: Uint8Array): string {
  return Buffer.from(bytes).toString("base64");
}

function unbase64(text: string, what: string): Uint8Array {
  if (!/^[A-Za-z0-9+/]*={0,2}$/.test(text) || text.length % 4 !== 0) {
    throw fail("usage", `${what} is not valid base64`);
  }
  return new Uint8Array(Buffer.from(text, "base64"));
}

/** Reads and decrypts the private key file `path` (see {@link readSigstorePrivateKey}). */
export async function loadSigstorePrivateKey(path: string, passphrase: string): Promise<KeyObject> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    throw fail("usage", `cannot read the private key ${path}: ${osReason(err)}`);
  }
  return await readSigstorePrivateKey(text, passphrase, `private key ${path}`);
}

/**
 * The passphrase in `path`: its first line, without the line break, as skopeo's
 * `--sign-passphrase-file` reads it (so `echo secret > file` works).
 */
export async function readPassphraseFile(path: string): Promise<string> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (err) {
    throw fail("usage", `cannot read the passphrase file ${path}: ${osReason(err)}`);
  }
  return text.split("\n")[0].replace(/\r$/, "");
}
