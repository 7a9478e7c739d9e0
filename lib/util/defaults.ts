/**
 * The defaults of sarde's user-facing options, in one place: the library applies them when an
 * option is not given, and `--help` quotes them from here, so the two cannot drift apart.
 * (`examples/*.ini` and README quote them too: change those along.) Defaults that depend on the
 * environment (the store and VM folders, the credentials file, the libvirt URI) are functions
 * next to the concept they locate: `defaultOcidir`, `defaultVmdir`, `defaultAuthFile`, and
 * libvirt's own default URI.
 *
 * @module
 */

/** Blobs transferred in parallel (`--concurrency`; fetch, push, pull, `export --push`). */
export const DEFAULT_CONCURRENCY = 4;

/**
 * How long a registry request may wait for its response headers, or for each piece of its body,
 * before it is given up and retried or resumed (`--response-timeout`): long enough for a busy
 * registry, short enough that a stalled connection does not hang a job.
 */
export const DEFAULT_RESPONSE_TIMEOUT_MS = 30_000;

/**
 * No retry of a failing request starts this long after its first attempt (`--retry-timeout`): a
 * registry that keeps failing or never answers ends in an error instead of hours of waiting.
 */
export const DEFAULT_RETRY_TIMEOUT_MS = 120_000;

/** Size of the uncompressed zstd chunks; see README ("Chunk size") for the measurements. */
export const DEFAULT_ZSTD_CHUNK = 64 << 20;

/**
 * zstd level. 2, not zstd's usual 3: on a 2 GB disk image level 3 cost 40 % more CPU
 * (6.9–7.4 vs 3.8–4.7 s) for a 1.5 % smaller image (919.8 vs 933.4 MB; gzip -6: 943 MB), and an
 * export is CPU-bound while a pull hardly depends on the level. See README ("zstd level").
 */
export const DEFAULT_ZSTD_LEVEL = 2;
