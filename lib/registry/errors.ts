/**
 * What a registry answered when it refused a request, as fields rather than message text: the
 * HTTP status, the error codes of the distribution error body, and whether another try may
 * succeed (go-containerregistry's `transport.Error`). Callers decide on these fields; the
 * messages only tell users.
 *
 * @module
 */

import { type ErrorKind, findError, SardeError } from "../util/errors.ts";
import { isRetryableStatus } from "../util/retry.ts";
import { type HttpResponse, isNetworkError } from "./http.ts";

/**
 * One entry of an OCI distribution error body, `{"errors":[{"code":"BLOB_UNKNOWN",…}]}`. The
 * spec's codes: `BLOB_UNKNOWN`, `BLOB_UPLOAD_INVALID`, `BLOB_UPLOAD_UNKNOWN`, `DIGEST_INVALID`,
 * `MANIFEST_BLOB_UNKNOWN`, `MANIFEST_INVALID`, `MANIFEST_UNKNOWN`, `NAME_INVALID`,
 * `NAME_UNKNOWN`, `SIZE_INVALID`, `UNAUTHORIZED`, `DENIED`, `UNSUPPORTED`, `TOOMANYREQUESTS`;
 * registries add their own, so any string is kept.
 */
export interface DistributionError {
  /** The machine-readable code, e.g. `MANIFEST_UNKNOWN`. */
  code: string;
  /** The registry's own words, for users. */
  message?: string;
  /** Anything else the registry attached (its shape is up to the registry). */
  detail?: unknown;
}

/** A registry's refusal of a request: a {@link SardeError} with the HTTP answer behind it. */
export class RegistryError extends SardeError {
  /** The HTTP status the registry answered. */
  readonly status: number;
  /** The entries of the distribution error body; empty for a body that is none (HTML, empty). */
  readonly errors: readonly DistributionError[];

  /** An error of `kind` for a response with `status` and the `errors` of its body. */
  constructor(
    kind: ErrorKind,
    message: string,
    options: { status: number; errors?: DistributionError[]; hint?: string; cause?: unknown },
  ) {
    super(kind, message, options);
    this.status = options.status;
    this.errors = options.errors ?? [];
  }

  /** The codes of {@link RegistryError.errors}, e.g. `["BLOB_UNKNOWN"]` (none left empty). */
  get codes(): string[] {
    return this.errors.map((e) => e.code).filter(Boolean);
  }

  /** Whether the same request may succeed later (408, 429 and 5xx but 501 and 505). */
  get retryable(): boolean {
    return isRetryableStatus(this.status);
  }
}

/**
 * The {@link RegistryError} behind `err`, looking through errors that wrap one (a retry's "gave
 * up after…"); `undefined` when no registry answer caused it.
 */
export function registryErrorOf(err: unknown): RegistryError | undefined {
  return findError(err, RegistryError);
}

/**
 * The entries of a distribution error body; none when the body is not one (an HTML page from a
 * proxy, an empty body, JSON without `errors`). An entry without a string `code` keeps its
 * message with the code `""` (messages show what the registry said).
 */
export function parseErrorBody(text: string): DistributionError[] {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    return [];
  }
  const errors = (body as { errors?: unknown } | null)?.errors;
  if (!Array.isArray(errors)) return [];
  return errors.filter((e) => typeof e === "object" && e !== null).map((e) => ({
    code: typeof e.code === "string" ? e.code : "",
    ...(typeof e.message === "string" ? { message: e.message } : {}),
    ...(e.detail !== undefined ? { detail: e.detail } : {}),
  }));
}

/**
 * The error for a response no caller accepts, read from its status and body: `what` (e.g.
 * "manifest app:1") names the request; `hasCredentials` picks the hint for 401 and 403.
 */
export async function responseError(
  res: HttpResponse,
  what: string,
  registry: string,
  hasCredentials: boolean,
): Promise<RegistryError> {
  const status = res.status;
  let text = "";
  try {
    text = await res.text();
  } catch { /* a body we cannot read says nothing */ }
  const errors = parseErrorBody(text);
  const detail = errors.map((e) => [e.code, e.message].filter(Boolean).join(": ")).join("; ");
  const suffix = detail ? ` (${detail})` : "";
  if (status === 404) {
    return new RegistryError("not-found", `${what}: not found on ${registry}${suffix}`, {
      status,
      errors,
    });
  }
  if (status === 401 || status === 403) {
    return new RegistryError("auth", `${what}: access denied by ${registry}${suffix}`, {
      status,
      errors,
      hint: hasCredentials
        ? `the stored credentials lack permission; check them with sarde login ${registry}`
        : `log in first: sarde login ${registry}`,
    });
  }
  if (status === 413) {
    return new RegistryError(
      "registry",
      `${what}: ${registry} refused a request body as too large (413)`,
      {
        status,
        errors,
        hint: "use --chunk-size (e.g. 4MiB) for registries or proxies that cap request bodies",
      },
    );
  }
  return new RegistryError("registry", `${what}: ${registry} answered HTTP ${status}${suffix}`, {
    status,
    errors,
  });
}

/**
 * The error for a server that answers, but not the way an OCI registry must; `status` when the
 * status itself gave it away (`GET /v2/` answered 404).
 */
export function notARegistry(registry: string, detail: string, status?: number): SardeError {
  const message = `${registry} does not behave like an OCI registry: ${detail}`;
  const hint = "check the registry address and port: is a web server or proxy answering instead?";
  return status === undefined
    ? new SardeError("registry", message, { hint })
    : new RegistryError("registry", message, { status, hint });
}

/**
 * Whether an upload that failed with `err` is worth starting again: a connection problem
 * (`network`), or a registry answer that is {@link RegistryError.retryable} (408, 429, 5xx but
 * 501 and 505) — the same rule as for retrying a single request, so that a registry that does not
 * implement something (501) is told so once instead of being sent the whole blob again.
 */
export function restartsUpload(err: unknown): boolean {
  if (isNetworkError(err)) return true;
  if (!(err instanceof SardeError) || err.kind !== "registry") return false;
  return registryErrorOf(err)?.retryable ?? false;
}
