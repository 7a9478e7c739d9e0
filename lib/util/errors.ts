/**
 * The one error type sarde throws for conditions a user can act on.
 *
 * Anything else that escapes is a bug; the CLI prints a `SardeError` as one line (plus an optional
 * hint) and exits with its `exitCode`, never with a stack trace.
 *
 * @module
 */

/** Broad classes of failure, used by callers (and tests) to react without parsing messages. */
export type ErrorKind =
  | "usage" // bad arguments, malformed reference or config
  | "not-found" // image, tag, blob or VM does not exist
  | "auth" // credentials missing or rejected
  | "network" // connection refused, DNS, TLS, timeouts
  | "registry" // the registry answered with an unexpected status
  | "integrity" // a digest or size did not match
  | "trust" // the trust policy (containers-policy.json) refused the image
  | "io" // local filesystem trouble
  | "interrupted" // Ctrl-C / SIGTERM
  | "external"; // an external program (virsh, qemu-img, zstd) failed

const exitCodes: Record<ErrorKind, number> = {
  usage: 2,
  "not-found": 3,
  auth: 4,
  network: 5,
  registry: 5,
  integrity: 6,
  trust: 7,
  io: 1,
  interrupted: 130,
  external: 1,
};

/** An error with a message meant for users, a kind, and an optional hint on what to do. */
export class SardeError extends Error {
  /** What kind of failure this is. */
  readonly kind: ErrorKind;
  /** A short suggestion printed after the message, e.g. "run `sarde login HOST` first". */
  readonly hint?: string;

  /** An error of `kind` with a one-line `message`; `cause` keeps the low-level error. */
  constructor(kind: ErrorKind, message: string, options?: { hint?: string; cause?: unknown }) {
    super(message, { cause: options?.cause });
    this.name = "SardeError";
    this.kind = kind;
    this.hint = options?.hint;
  }

  /** The process exit code the CLI uses for this error. */
  get exitCode(): number {
    return exitCodes[this.kind];
  }
}

/** Shorthand: `throw fail("usage", "…")`. */
export function fail(kind: ErrorKind, message: string, hint?: string): SardeError {
  return new SardeError(kind, message, { hint });
}

/** A one-line description of any thrown value, for logs. */
export function describeError(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

/**
 * The first error in `err`'s chain of causes (`err` itself first) that is a `type`, like Go's
 * `errors.As`: an error that wraps another (a retry's "gave up after…") keeps the fields of the
 * one it wraps without copying them.
 */
export function findError<T extends Error>(
  err: unknown,
  type: abstract new (...args: never[]) => T,
): T | undefined {
  for (let e = err; e instanceof Error; e = e.cause) {
    if (e instanceof type) return e;
  }
  return undefined;
}
