/**
 * Image references, parsed the way docker and containerd do:
 * `[host[:port]/]path[:tag][@sha256:hex]`, with `docker.io` and `library/` as defaults.
 *
 * A reference has two faces: the remote one (`registry` + `repository`, normalised) and the local
 * one (`name`, the path exactly as written minus tag and digest), which sardinecake 0.4 used as the
 * folder below its OCI cache. Keeping `name` as written keeps 0.4 caches readable.
 *
 * @module
 */

import { fail } from "../util/errors.ts";

/** A parsed image reference. */
export interface Reference {
  /** Registry host with optional port, e.g. `docker.io`, `127.0.0.1:5000`. */
  registry: string;
  /** Repository path inside the registry, e.g. `library/debian`, `sardines/debian12`. */
  repository: string;
  /** Tag, if one was given. */
  tag?: string;
  /** Manifest digest (`sha256:…`), if one was given. */
  digest?: string;
  /** The name as written (host and path, no tag or digest): the local cache path. */
  name: string;
}

/** The registry used when a reference names none. */
export const DEFAULT_REGISTRY = "docker.io";
/** The tag used when a reference names neither tag nor digest. */
export const DEFAULT_TAG = "latest";

const domainComponent = "(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])";
const domainRe = new RegExp(
  `^(?:${domainComponent}(?:\\.${domainComponent})*|\\[[0-9a-fA-F:.]+\\])(?::[0-9]{1,5})?$`,
);
const pathComponentRe = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const tagRe = /^[\w][\w.-]{0,127}$/;
const digestRe = /^sha256:[a-f0-9]{64}$/;
const MAX_NAME_LENGTH = 255;

function bad(input: string, why: string): never {
  throw fail(
    "usage",
    `invalid image reference '${input}': ${why}`,
    "references look like host[:port]/path/name[:tag][@sha256:<64 hex>], e.g. registry.example.org/sardines/debian12:latest",
  );
}

/** Whether the first path element of a name is a registry host rather than a repository part. */
function looksLikeHost(first: string): boolean {
  return first.includes(".") || first.includes(":") || first === "localhost" ||
    first.toLowerCase() !== first;
}

/**
 * Parses an image reference. Throws a `usage` {@link SardeError} with a clear message when it is
 * malformed; never guesses.
 */
export function parseReference(input: string): Reference {
  const text = input.trim();
  if (text === "") bad(input, "it is empty");
  if (/\s/.test(text)) bad(input, "it contains white space");

  let rest = text;
  let digest: string | undefined;
  const at = rest.indexOf("@");
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!digestRe.test(digest)) {
      bad(input, `'${digest}' is not a digest (expected sha256: and 64 lowercase hex digits)`);
    }
  }

  // A tag follows the last ':' only if no '/' comes after it (else the ':' is a port).
  let tag: string | undefined;
  const colon = rest.lastIndexOf(":");
  if (colon > rest.lastIndexOf("/")) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!tagRe.test(tag)) {
      bad(input, `'${tag}' is not a valid tag (letters, digits, '_', '.', '-'; at most 128)`);
    }
  }
  if (rest === "") bad(input, "the repository name is missing");
  if (rest.length > MAX_NAME_LENGTH) bad(input, `the name is longer than ${MAX_NAME_LENGTH}`);

  let registry = DEFAULT_REGISTRY;
  let path = rest;
  const slash = rest.indexOf("/");
  if (slash >= 0 && looksLikeHost(rest.slice(0, slash))) {
    registry = rest.slice(0, slash);
    path = rest.slice(slash + 1);
    if (!domainRe.test(registry)) bad(input, `'${registry}' is not a valid registry host`);
    const port = registry.match(/:(\d+)$/)?.[1];
    if (port && Number(port) > 65535) bad(input, `port ${port} is out of range`);
    // One spelling per registry, as the containers tools normalise it: host names are not case
    // sensitive, and Docker Hub's aliases are docker.io. Policy scopes, credentials and mirrors
    // are looked up by this name, so an alias must not slip past a rule for the real one.
    registry = registry.toLowerCase();
    if (["index.docker.io", "registry-1.docker.io"].includes(registry)) registry = DEFAULT_REGISTRY;
  }
  if (path === "") bad(input, "the repository name is missing");
  for (const component of path.split("/")) {
    if (component === "") bad(input, "it has an empty path component ('//' or a trailing '/')");
    if (component.toLowerCase() !== component) {
      bad(input, `repository names must be lowercase ('${component}')`);
    }
    if (!pathComponentRe.test(component)) {
      bad(input, `'${component}' is not a valid repository path component`);
    }
  }
  let repository = path;
  if (registry === DEFAULT_REGISTRY && !path.includes("/")) repository = `library/${path}`;
  return { registry, repository, tag, digest, name: rest };
}

/** The canonical string form: `registry/repository[:tag][@digest]`. */
export function formatReference(ref: Reference): string {
  let s = `${ref.registry}/${ref.repository}`;
  if (ref.tag) s += `:${ref.tag}`;
  if (ref.digest) s += `@${ref.digest}`;
  return s;
}

/** The local form: `name[:tag][@digest]` as the user wrote it. */
export function formatLocalName(ref: Reference): string {
  let s = ref.name;
  if (ref.tag) s += `:${ref.tag}`;
  if (ref.digest) s += `@${ref.digest}`;
  return s;
}

/** What to ask the registry for: the digest if pinned, else the tag, else `latest`. */
export function manifestSelector(ref: Reference): string {
  return ref.digest ?? ref.tag ?? DEFAULT_TAG;
}

/** The host to connect to for a registry name (`docker.io` lives at `registry-1.docker.io`). */
export function registryEndpointHost(registry: string): string {
  return registry === DEFAULT_REGISTRY ? "registry-1.docker.io" : registry;
}

/**
 * Whether plain http is the default for this registry: loopback hosts, like docker and skopeo
 * treat them. Everything else uses https unless `--insecure` is given.
 */
export function isLoopbackRegistry(registry: string): boolean {
  const host = registry.replace(/:\d+$/, "").replace(/^\[|\]$/g, "");
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

/**
 * Parses a registry argument (`host[:port]`, also `https://host/` as docker config keys write it)
 * into `host[:port]`. Docker Hub aliases become `docker.io`.
 */
export function parseRegistryHost(input: string): string {
  const host = input.trim().replace(/^[a-z]+:\/\//i, "").replace(/\/.*$/, "");
  if (!host || !domainRe.test(host)) {
    throw fail(
      "usage",
      `invalid registry '${input}'`,
      "give a host name with an optional port, e.g. registry.example.org or 127.0.0.1:5000",
    );
  }
  return ["index.docker.io", "registry-1.docker.io"].includes(host)
    ? DEFAULT_REGISTRY
    : host.toLowerCase();
}
