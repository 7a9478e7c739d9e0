/**
 * How to reach a registry, from user options: plain http (`--insecure`), certificate checks
 * (`--tls-verify`), and extra CAs from `--cert-dir`, `--ca-file` and the per-host folders
 * `/etc/containers/certs.d/<host>/` and `/etc/docker/certs.d/<host>/` that skopeo and docker read.
 *
 * @module
 */

import { join } from "node:path";
import { fail } from "../util/errors.ts";
import type { TransportOptions } from "./http.ts";
import { debug } from "../util/log.ts";

/** TLS-related user options. */
export interface TlsSettings {
  /** Plain http. */
  insecure?: boolean;
  /** Verify certificates (default true). */
  tlsVerify?: boolean;
  /** A folder of `*.crt` CA files (skopeo's `--cert-dir`). */
  certDir?: string;
  /** One PEM CA file. */
  caFile?: string;
}

async function readCrtFiles(dir: string, required: boolean): Promise<string[]> {
  const certs: string[] = [];
  try {
    for await (const e of Deno.readDir(dir)) {
      if (e.isFile && e.name.endsWith(".crt")) {
        certs.push(await Deno.readTextFile(join(dir, e.name)));
      }
    }
  } catch (err) {
    if (required) {
      throw fail("usage", `cannot read certificate folder ${dir}: ${(err as Error).message}`);
    }
    return [];
  }
  if (required && certs.length === 0) {
    throw fail("usage", `no *.crt files in certificate folder ${dir}`);
  }
  if (certs.length) debug(`trusting ${certs.length} CA file(s) from ${dir}`);
  return certs;
}

/** Builds the transport options for `registry` from user settings and the per-host folders. */
export async function transportFor(
  registry: string,
  settings: TlsSettings = {},
): Promise<TransportOptions> {
  const caCerts: string[] = [];
  if (settings.certDir) caCerts.push(...await readCrtFiles(settings.certDir, true));
  if (settings.caFile) {
    try {
      caCerts.push(await Deno.readTextFile(settings.caFile));
    } catch (err) {
      throw fail("usage", `cannot read CA file ${settings.caFile}: ${(err as Error).message}`);
    }
  }
  for (const root of ["/etc/containers/certs.d", "/etc/docker/certs.d"]) {
    caCerts.push(...await readCrtFiles(join(root, registry), false));
  }
  return {
    plainHttp: settings.insecure === true,
    tlsVerify: settings.tlsVerify !== false,
    caCerts,
  };
}
