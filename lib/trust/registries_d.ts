/**
 * Signature storage settings from containers-registries.d(5): the `*.yaml` files of one folder,
 * each with `default-docker:` and `docker: {<scope>: …}` sections. sarde reads sigstore
 * attachments only (`use-sigstore-attachments`); lookaside (`lookaside`, `sigstore`) storage is
 * accepted and ignored. A scope (or `default-docker`) defined in two files is an error, values of
 * the wrong type are errors, and unknown keys are ignored, all as in containers/image.
 *
 * Which folder: `--registries.d`, else `~/.config/containers/registries.d` if it exists, else
 * `/etc/containers/registries.d`; a missing default folder means no settings, a missing
 * `--registries.d` folder is an error (containers/image ignores it, hiding the typo).
 *
 * @module
 */

import { homedir } from "node:os";
import { join } from "node:path";
import { parse } from "yaml";
import { fail, SardeError } from "../util/errors.ts";
import { osReason } from "../util/fsutil.ts";
import type { Reference } from "../oci/reference.ts";
import { scopesFor } from "./policy.ts";

/** The system folder. */
export const SYSTEM_REGISTRIES_D = "/etc/containers/registries.d";

/** One `default-docker` or `docker` scope section. */
export interface RegistryNamespace {
  /** `use-sigstore-attachments`, when set. */
  useSigstoreAttachments?: boolean;
}

/** The merged settings of a folder. */
export interface RegistriesD {
  /** The folder read (`""` when none existed). */
  dir: string;
  defaultDocker?: RegistryNamespace;
  /** `docker:` sections by scope. */
  docker: Map<string, RegistryNamespace>;
}

const NAMESPACE_KEYS = [
  "lookaside",
  "lookaside-staging",
  "sigstore",
  "sigstore-staging",
  "use-sigstore-attachments",
];

function parseNamespace(file: string, where: string, value: unknown): RegistryNamespace {
  const bad = (why: string): never => {
    throw fail("usage", `${file}: ${where}: ${why}`, "see containers-registries.d(5)");
  };
  if (value === null || value === undefined) return {};
  if (typeof value !== "object" || Array.isArray(value)) bad("must be a mapping");
  const obj = value as Record<string, unknown>;
  for (const k of NAMESPACE_KEYS.slice(0, 4)) {
    if (obj[k] !== undefined && typeof obj[k] !== "string") bad(`"${k}" must be a string`);
  }
  const use = obj["use-sigstore-attachments"];
  if (use !== undefined && typeof use !== "boolean") {
    bad(`"use-sigstore-attachments" must be true or false`);
  }
  return { useSigstoreAttachments: use as boolean | undefined };
}

/** Loads the `*.yaml` files of `dir` (see the module docs for the default). */
export async function loadRegistriesD(dir?: string): Promise<RegistriesD> {
  let folder = dir;
  if (!folder) {
    const user = join(homedir(), ".config/containers/registries.d");
    folder = await Deno.stat(user).then(() => user, () => SYSTEM_REGISTRIES_D);
  }
  const result: RegistriesD = { dir: folder, docker: new Map() };
  let names: string[];
  try {
    names = [];
    for await (const e of Deno.readDir(folder)) if (e.name.endsWith(".yaml")) names.push(e.name);
  } catch (err) {
    // Only the default folders may be missing: a folder named on the command line is a typo.
    if (err instanceof Deno.errors.NotFound && !dir) return { ...result, dir: "" };
    throw new SardeError("usage", `cannot read registries.d folder ${folder}: ${osReason(err)}`, {
      cause: err,
    });
  }
  const from = new Map<string, string>();
  for (const name of names.sort()) {
    const file = join(folder, name);
    let doc: unknown;
    try {
      doc = parse(await Deno.readTextFile(file));
    } catch (err) {
      const why = (err as Error).message.split("\n")[0];
      throw new SardeError("usage", `${file}: not valid YAML: ${why}`, { cause: err });
    }
    if (doc === null || doc === undefined) continue;
    if (typeof doc !== "object" || Array.isArray(doc)) {
      throw fail("usage", `${file}: must be a mapping with default-docker and docker keys`);
    }
    const top = doc as Record<string, unknown>;
    if (top["default-docker"] !== undefined) {
      if (from.has("default-docker")) {
        throw fail(
          "usage",
          `"default-docker" is defined both in ${from.get("default-docker")} and ${file}`,
        );
      }
      from.set("default-docker", file);
      result.defaultDocker = parseNamespace(file, "default-docker", top["default-docker"]);
    }
    const docker = top.docker ?? {};
    if (typeof docker !== "object" || Array.isArray(docker)) {
      throw fail("usage", `${file}: "docker" must be a mapping of scopes`);
    }
    for (const [scope, ns] of Object.entries(docker as Record<string, unknown>)) {
      if (result.docker.has(scope)) {
        throw fail(
          "usage",
          `docker scope "${scope}" is defined both in ${from.get(`docker:${scope}`)} and ${file}`,
        );
      }
      from.set(`docker:${scope}`, file);
      result.docker.set(scope, parseNamespace(file, `docker "${scope}"`, ns));
    }
  }
  return result;
}

/**
 * Whether signatures of `ref` are read from sigstore attachments: the most specific scope that
 * sets `use-sigstore-attachments`, else `default-docker`'s, else false.
 */
export function useSigstoreAttachments(config: RegistriesD, ref: Reference): boolean {
  for (const scope of scopesFor(ref)) {
    const v = config.docker.get(scope)?.useSigstoreAttachments;
    if (v !== undefined) return v;
  }
  return config.defaultDocker?.useSigstoreAttachments ?? false;
}
