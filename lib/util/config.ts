/**
 * INI configuration files of `sarde` and of `gitlab-sardinecake-executor`.
 *
 * The dialect is the one sardinecake 0.4 read through Python's `configparser`, so existing files keep
 * working: `key = value` or `key: value`, full-line `#`/`;` comments, indented continuation lines,
 * case-insensitive keys, a `[DEFAULT]` section, and `%%` for a literal `%`. Differences, all on
 * purpose (spec §4, §8.4, §10 items 24–27):
 *
 * - keys are normalised to the long-option form: lower case, `_` and `-` equivalent (`print_uuid`
 *   and `print-uuid` are the same key; 0.4 only understood the first);
 * - a section for one command never leaks into another command (0.4 shared one mutable dict);
 * - values are typed by the getters: `raw = false` is false, `chunksize = 1000000` is the integer
 *   1000000, paths get `~` expanded in both programs;
 * - `%` not followed by `%` is kept literally instead of failing interpolation.
 *
 * Why not the `ini` npm package (which the project otherwise prefers, as a maintained library):
 * it splits section names on dots (`[registry.example.org/sardines/debian:latest]` becomes nested
 * objects), reads `key: value` as a key named `key: value` set to `true`, accepts garbage lines
 * silently, turns `true`/`false` into booleans, and keeps no line numbers. The executor's sections
 * are image names full of dots and we want errors of the form `file:line: …`, so a small parser of
 * the configparser subset is simpler than working around all of that.
 *
 * @module
 */

import { fail, SardeError } from "./errors.ts";
import { warn } from "./log.ts";
import { parseBoolean, parseSize } from "./units.ts";

/** The section every other section inherits from. Case-sensitive, as in configparser. */
export const DEFAULT_SECTION = "DEFAULT";

/** Config files of `sarde`, lowest priority first (replaced by `$SARDE_CONF_FILES`). */
export const SARDE_CONF_FILES: readonly string[] = [
  "/etc/sardinecake/sarde.ini",
  "~/.config/sardinecake/sarde.ini",
];

/**
 * Config files of `gitlab-sardinecake-executor`, lowest priority first (replaced by
 * `$GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES`).
 */
export const EXECUTOR_CONF_FILES: readonly string[] = [
  "/etc/gitlab-runner/gitlab-sardinecake-executor.ini",
  "~/.config/gitlab-runner/gitlab-sardinecake-executor.ini",
];

/** One value read from a file, with its origin so that errors can point at it. */
export interface IniEntry {
  /** The value: trimmed, continuation lines joined with `\n`, `%%` already turned into `%`. */
  value: string;
  /** The file it was read from, as given to {@link loadIni}. */
  file: string;
  /** The 1-based line of its `key = value` line. */
  line: number;
}

/** Merged contents of INI files. */
export interface IniData {
  /** The files that existed and were read, in the order read. */
  files: string[];
  /**
   * Section name (case-sensitive, verbatim, dots and all) → normalised key → entry. Sections keep
   * the order of their first appearance, which decides ties between equally long image patterns.
   */
  sections: Map<string, Map<string, IniEntry>>;
  /** Where each section's header first appears (an empty section has no entry to point at). */
  headers: Map<string, { file: string; line: number }>;
}

/** Where a value of a `sectionValues` result came from; kept aside so results stay plain records. */
interface Origin extends IniEntry {
  section: string;
}

// Results of sectionValues/imageSectionValues are typed Record<string, string> so that callers can
// spread and compare them freely; the getters still find file/line/section through this side table.
const origins = new WeakMap<object, Map<string, Origin>>();

/** Normalises a key to the long-option form used everywhere: lower case, `_` written as `-`. */
export function normalizeKey(key: string): string {
  return key.trim().toLowerCase().replaceAll("_", "-");
}

/**
 * Expands a leading `~` or `~/` to `$HOME`; anything else (including `~user`) is returned as is.
 * A trailing `/` is kept, because for `vmdir` it means "one subfolder per VM" (spec §2.3).
 */
export function expandHome(path: string): string {
  if (path !== "~" && !path.startsWith("~/")) return path;
  const home = Deno.env.get("HOME");
  // Without HOME there is nothing sensible to expand to; the literal path then simply won't exist.
  if (!home) return path;
  return path === "~" ? home : home.replace(/\/+$/, "") + path.slice(1);
}

/**
 * The config files to read: the `:`-separated list in `envVar` when it is set and non-empty (it
 * replaces the defaults, it does not add to them), else `defaults`; `~` is expanded in both.
 */
export function configFiles(envVar: string, defaults: readonly string[]): string[] {
  const fromEnv = Deno.env.get(envVar);
  const list = fromEnv ? fromEnv.split(":").filter((f) => f !== "") : [...defaults];
  return list.map(expandHome);
}

/**
 * Reads `files` in order and merges them: a later file overrides an earlier one key by key.
 * Missing files are skipped silently (the defaults usually do not exist); a file that exists but
 * cannot be read, or does not parse, is a `usage` error naming the file (and line).
 */
export async function loadIni(files: readonly string[]): Promise<IniData> {
  const data: IniData = { files: [], sections: new Map(), headers: new Map() };
  for (const file of files) {
    let text: string;
    try {
      text = await Deno.readTextFile(file);
    } catch (err) {
      // ENOTDIR (a path component is a file) means "not there" just as much as ENOENT does.
      if (err instanceof Deno.errors.NotFound || err instanceof Deno.errors.NotADirectory) continue;
      throw new SardeError("usage", `cannot read config file ${file}: ${(err as Error).message}`, {
        cause: err,
      });
    }
    parseInto(data, text, file);
    data.files.push(file);
  }
  return data;
}

/** Parses one file's text into `data` (configparser subset; see the module comment). */
function parseInto(data: IniData, text: string, file: string): void {
  const lines = text.replace(/^\uFEFF/, "").split(/\r\n|\n|\r/);
  let section: Map<string, IniEntry> | undefined;
  let sectionName = "";
  // Duplicate keys in one section of one file are almost always a mistake (configparser refuses
  // them too); across files, and across repeated headers of the same section, they merge.
  const seen = new Map<string, number>();
  let last: { entry: IniEntry; indent: number } | undefined;
  const bad = (line: number, msg: string) => fail("usage", `${file}:${line}: ${msg}`);

  for (let i = 0; i < lines.length; i++) {
    const lineNo = i + 1;
    const raw = lines[i];
    const text = raw.trim();
    if (text === "") {
      last = undefined; // a blank line ends a multi-line value
      continue;
    }
    if (text.startsWith("#") || text.startsWith(";")) continue; // comments may sit inside values
    const indent = raw.length - raw.trimStart().length;
    if (last && indent > last.indent) {
      last.entry.value += "\n" + unescapePercent(text);
      continue;
    }
    last = undefined;

    // Greedy `.+` up to the last `]`, trailing text ignored: exactly configparser's header rule.
    const header = /^\[(.+)\]/.exec(text);
    if (header) {
      sectionName = header[1].trim();
      if (sectionName === "") throw bad(lineNo, "empty section name");
      section = data.sections.get(sectionName);
      if (!section) {
        data.sections.set(sectionName, section = new Map());
        data.headers.set(sectionName, { file, line: lineNo });
      }
      continue;
    }
    const kv = /^(.*?)\s*[=:]\s*(.*)$/.exec(text);
    if (!kv) throw bad(lineNo, `expected 'key = value' or '[section]', got '${text}'`);
    const key = normalizeKey(kv[1]);
    if (key === "") throw bad(lineNo, `missing key name before '${text[kv[1].length]}'`);
    if (!section) {
      throw bad(
        lineNo,
        `'${key}' is outside any section (add a [DEFAULT] or [section] line above)`,
      );
    }
    const id = `${sectionName}\0${key}`;
    const earlier = seen.get(id);
    if (earlier !== undefined) {
      throw bad(lineNo, `'${key}' is set twice in [${sectionName}] (first on line ${earlier})`);
    }
    seen.set(id, lineNo);
    const entry: IniEntry = { value: unescapePercent(kv[2]), file, line: lineNo };
    section.set(key, entry);
    last = { entry, indent };
  }
}

/** 0.4 files had to write `%%` for `%` (configparser interpolation); other `%`s stay literal. */
function unescapePercent(value: string): string {
  return value.replaceAll("%%", "%");
}

/** Builds a plain record from (section, entries) pairs, later pairs winning, and notes origins. */
function collect(parts: [string, Map<string, IniEntry> | undefined][]): Record<string, string> {
  const where = new Map<string, Origin>();
  for (const [section, entries] of parts) {
    for (const [key, entry] of entries ?? []) where.set(key, { ...entry, section });
  }
  // fromEntries defines own properties, so even a key named `__proto__` stays a plain value.
  const values = Object.fromEntries([...where].map(([k, o]) => [k, o.value]));
  origins.set(values, where);
  return values;
}

/**
 * The values for one `sarde` command: `[DEFAULT]` overridden by the command's own section.
 * Another command's section is never consulted (0.4 leaked, e.g. `[export] ocidir` into `import`).
 * `sectionValues(data, "DEFAULT")` gives the defaults alone.
 */
export function sectionValues(data: IniData, section: string): Record<string, string> {
  const defaults = data.sections.get(DEFAULT_SECTION);
  if (section === DEFAULT_SECTION) return collect([[DEFAULT_SECTION, defaults]]);
  return collect([[DEFAULT_SECTION, defaults], [section, data.sections.get(section)]]);
}

/**
 * Shell-style wildcard match with Python `fnmatch` semantics on POSIX: case-sensitive, `*` matches
 * anything including `/`, `?` one character, `[abc]`/`[a-z]`/`[!abc]` a set; an unclosed `[` is a
 * literal. Used for executor image sections and image allow-lists.
 */
export function fnmatch(pattern: string, name: string): boolean {
  let re = "";
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === "*") re += "[\\s\\S]*";
    else if (c === "?") re += "[\\s\\S]";
    else if (c === "[") {
      // As in fnmatch.translate: a `!` and then a `]` right after `[` belong to the set.
      let j = i + 1;
      if (pattern[j] === "!") j++;
      if (pattern[j] === "]") j++;
      while (j < pattern.length && pattern[j] !== "]") j++;
      if (j >= pattern.length) {
        re += "\\[";
        continue;
      }
      // JS reads `[]` as an empty set, so a leading `]` (the only one possible here) is escaped.
      let set = pattern.slice(i + 1, j).replaceAll("\\", "\\\\").replaceAll("]", "\\]");
      if (set.startsWith("!")) set = "^" + set.slice(1);
      else if (set.startsWith("^")) set = "\\" + set;
      re += `[${set}]`;
      i = j;
    } else re += c.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
  }
  try {
    return new RegExp(`^(?:${re})$`).test(name);
  } catch {
    // e.g. a reversed range `[z-a]`: Python drops it and matches nothing; so do we.
    return false;
  }
}

/**
 * The name of the executor section that applies to `image`: the section named exactly like the
 * image, else the longest section name that matches it as a wildcard pattern (the first such
 * section on a tie, as 0.4's `max()` did); `undefined` when none does. `[DEFAULT]` never counts.
 */
export function imageSectionName(data: IniData, image: string): string | undefined {
  if (image !== DEFAULT_SECTION && data.sections.has(image)) return image;
  let best: string | undefined;
  for (const name of data.sections.keys()) {
    if (name === DEFAULT_SECTION || !fnmatch(name, image)) continue;
    if (best === undefined || name.length > best.length) best = name;
  }
  return best;
}

/**
 * The executor's values for a job image: `[DEFAULT]` overridden by the section chosen by
 * {@link imageSectionName}. (0.4 did not inherit `[DEFAULT]` into image sections but ranked it
 * below command-line options; callers needing that order can use `imageSectionName` and
 * `sectionValues(data, "DEFAULT")` separately.)
 */
export function imageSectionValues(data: IniData, image: string): Record<string, string> {
  const name = imageSectionName(data, image);
  if (name === undefined) return sectionValues(data, DEFAULT_SECTION);
  return sectionValues(data, name);
}

/** Describes where `key` of a values record came from, for error messages. */
function where(values: Record<string, string>, key: string): string {
  const o = origins.get(values)?.get(key);
  return o ? `${o.file}:${o.line}: [${o.section}] ${key}` : `config key '${key}'`;
}

/** Looks up a normalised key; only own properties count (so `constructor` is not a key). */
function lookup(values: Record<string, string>, key: string): [string, string | undefined] {
  const k = normalizeKey(key);
  return [k, Object.hasOwn(values, k) ? values[k] : undefined];
}

/**
 * Runs `use` with the name of `key` as the files give it (`[section] key`, or the bare key for a
 * record not made by {@link sectionValues}); a usage error it throws gets the value's `file:line:`
 * in front. This way the parser of a command-line option can check the same key's INI value and
 * say where it is: `sarde.ini:3: invalid [pull] concurrency '0' (expected a whole number ≥ 1)`.
 */
export function atOrigin<T>(
  values: Record<string, string>,
  key: string,
  use: (what: string) => T,
): T {
  const k = normalizeKey(key);
  const o = origins.get(values)?.get(k);
  if (!o) return use(k);
  try {
    return use(`[${o.section}] ${k}`);
  } catch (err) {
    if (!(err instanceof SardeError)) throw err;
    throw new SardeError(err.kind, `${o.file}:${o.line}: ${err.message}`, {
      hint: err.hint,
      cause: err,
    });
  }
}

/** Shared shape of the typed getters: unset or empty → fallback; otherwise parse, or fail. */
function typed<T>(
  values: Record<string, string>,
  key: string,
  fallback: T | undefined,
  expected: string,
  parse: (text: string) => T,
): T | undefined {
  const [k, text] = lookup(values, key);
  // Empty means "not set": it lets a section cancel a [DEFAULT] value (`chunksize =`).
  if (text === undefined || text.trim() === "") return fallback;
  try {
    return parse(text.trim());
  } catch (err) {
    if (!(err instanceof SardeError)) throw err;
    throw fail("usage", `${where(values, k)} = '${text}': expected ${expected}`);
  }
}

/** A string value as written (empty strings included), or `fallback` when the key is not set. */
export function getString(values: Record<string, string>, key: string): string | undefined;
/** A string value as written (empty strings included), or `fallback` when the key is not set. */
export function getString(values: Record<string, string>, key: string, fallback: string): string;
export function getString(
  values: Record<string, string>,
  key: string,
  fallback?: string,
): string | undefined {
  return lookup(values, key)[1] ?? fallback;
}

/**
 * A boolean: `true/false`, `yes/no`, `on/off`, `1/0`, any case (0.4 read `false` as true).
 * Unset or empty gives `fallback`; anything else is a one-line `usage` error naming file and key.
 */
export function getBoolean(values: Record<string, string>, key: string): boolean | undefined;
/** A boolean (see the first overload), or `fallback` when unset or empty. */
export function getBoolean(values: Record<string, string>, key: string, fallback: boolean): boolean;
export function getBoolean(
  values: Record<string, string>,
  key: string,
  fallback?: boolean,
): boolean | undefined {
  return typed(values, key, fallback, "true or false (yes/no, on/off, 1/0)", parseBoolean);
}

/**
 * A size in whole bytes via `parseSize` (`256 MiB`, `7M` = 7·1024², `7MB` = 7·10⁶, `1000000`).
 * Unset or empty gives `fallback`.
 */
export function getSize(values: Record<string, string>, key: string): number | undefined;
/** A size in whole bytes (see the first overload), or `fallback` when unset or empty. */
export function getSize(values: Record<string, string>, key: string, fallback: number): number;
export function getSize(
  values: Record<string, string>,
  key: string,
  fallback?: number,
): number | undefined {
  return typed(values, key, fallback, "a size such as 256MiB, 4M, 1GB or 1000000", parseSize);
}

/** An integer (optionally signed). Unset or empty gives `fallback`. */
export function getInt(values: Record<string, string>, key: string): number | undefined;
/** An integer, or `fallback` when unset or empty. */
export function getInt(values: Record<string, string>, key: string, fallback: number): number;
export function getInt(
  values: Record<string, string>,
  key: string,
  fallback?: number,
): number | undefined {
  return typed(values, key, fallback, "a whole number", (t) => {
    const n = Number(t);
    if (!/^[+-]?\d+$/.test(t) || !Number.isSafeInteger(n)) throw fail("usage", "not an integer");
    return n;
  });
}

/**
 * A path with a leading `~` or `~/` expanded to `$HOME` (in both programs; the 0.4 executor did
 * not expand, so its own example created a literal `~` folder). A trailing `/` is kept. Relative
 * paths stay relative to the working directory, as in 0.4. Unset or empty gives `fallback`.
 */
export function getPath(values: Record<string, string>, key: string): string | undefined;
/** A `~`-expanded path (see the first overload), or `fallback` when unset or empty. */
export function getPath(values: Record<string, string>, key: string, fallback: string): string;
export function getPath(
  values: Record<string, string>,
  key: string,
  fallback?: string,
): string | undefined {
  return typed(values, key, fallback, "a path", expandHome);
}

/**
 * A list: items separated by commas and/or whitespace, empty items dropped (`allowed-images`,
 * `pull-policy`). Unset gives `fallback`; an empty value gives `[]`.
 */
export function getList(values: Record<string, string>, key: string): string[] | undefined;
/** A list (see the first overload), or `fallback` when unset. */
export function getList(values: Record<string, string>, key: string, fallback: string[]): string[];
export function getList(
  values: Record<string, string>,
  key: string,
  fallback?: string[],
): string[] | undefined {
  const text = lookup(values, key)[1];
  if (text === undefined) return fallback;
  return text.split(/[\s,]+/).filter((s) => s !== "");
}

const durationUnits: Record<string, number> = {
  ms: 1,
  s: 1000,
  sec: 1000,
  second: 1000,
  m: 60_000,
  min: 60_000,
  minute: 60_000,
  h: 3_600_000,
  hour: 3_600_000,
  d: 86_400_000,
  day: 86_400_000,
  w: 604_800_000,
  week: 604_800_000,
};

/**
 * Parses a duration into **milliseconds** (what `setTimeout`, `Date.now()` and `AbortSignal.timeout`
 * use): one or more `<number><unit>` parts, e.g. `30s`, `5m`, `2h`, `1d`, `1h30m`, `1.5h`, `250ms`.
 * Units: `ms`, `s`/`sec`/`second(s)`, `m`/`min`/`minute(s)`, `h`/`hour(s)`, `d`/`day(s)`,
 * `w`/`week(s)`. A plain number is **seconds** (0.4's `timeout = 60`). Rounded to whole ms.
 */
export function parseDuration(text: string, what = "duration"): number {
  const t = text.trim().toLowerCase();
  const plain = /^\d+(?:\.\d+)?$/.test(t) ? Number(t) * 1000 : undefined;
  let total = plain ?? 0;
  if (plain === undefined) {
    const part = /(\d+(?:\.\d+)?)\s*([a-z]+)\s*/y;
    let pos = 0;
    while (pos < t.length) {
      part.lastIndex = pos;
      const m = part.exec(t);
      // Exact unit first, so that `ms` is not read as the plural of `m`.
      const factor = m ? durationUnits[m[2]] ?? durationUnits[m[2].replace(/s$/, "")] : undefined;
      if (!m || factor === undefined) {
        throw fail("usage", `invalid ${what} '${text}'`, "use e.g. 30s, 5m, 2h, 1d or 1h30m");
      }
      total += Number(m[1]) * factor;
      pos = part.lastIndex;
    }
    if (t === "") throw fail("usage", `invalid ${what} '${text}'`);
  }
  const ms = Math.round(total);
  if (!Number.isSafeInteger(ms)) throw fail("usage", `${what} '${text}' is too large`);
  return ms;
}

/**
 * A duration in milliseconds (see {@link parseDuration}) that must not be zero: a timeout of 0
 * would fail every request at once. `sarde`'s options and the executor's INI keys share it.
 */
export function parsePositiveDuration(text: string, what = "duration"): number {
  const ms = parseDuration(text, what);
  if (ms > 0) return ms;
  throw fail("usage", `invalid ${what} '${text}' (must be longer than 0)`);
}

/** A duration in **milliseconds** (see {@link parseDuration}). Unset or empty gives `fallback`. */
export function getDuration(values: Record<string, string>, key: string): number | undefined;
/** A duration in milliseconds, or `fallback` (also in milliseconds) when unset or empty. */
export function getDuration(values: Record<string, string>, key: string, fallback: number): number;
export function getDuration(
  values: Record<string, string>,
  key: string,
  fallback?: number,
): number | undefined {
  return typed(
    values,
    key,
    fallback,
    "a duration such as 30s, 5m, 2h or 1d (a plain number is seconds)",
    (t) => parseDuration(t),
  );
}

/**
 * Every key the executor reads (lib/executor/stages.ts); any other key is an error, because a typo such as
 * `allowed-image` would otherwise turn the image allow-list off without a word.
 */
export const EXECUTOR_KEYS: readonly string[] = [
  "connect",
  "ocidir",
  "vmdir",
  "clonedir",
  "timeout",
  "prepare-script",
  "username",
  "password",
  "identity-file",
  "image",
  "guest-builds-dir",
  "guest-cache-dir",
  "allowed-images",
  "pull-policy",
  "network",
  "network-restrict",
  "authfile",
  "insecure",
  "tls-verify",
  "cert-dir",
  "registries-conf",
  "policy",
  "registries.d",
  "max-job-age",
  "domain-type",
  "response-timeout",
  "retry-timeout",
  "vcpus",
  "memory",
  "max-vcpus",
  "max-memory",
  "cache-budget",
  "lazy-pull",
];

/** The sections and keys a program's INI files may contain (see {@link checkIni}). */
export interface IniSchema {
  /** Known sections and their keys. */
  sections: ReadonlyMap<string, readonly string[]>;
  /** The keys of every other section (executor image patterns); without it they are errors. */
  otherSections?: readonly string[];
  /** Other names of known sections (command aliases such as `ls`), to suggest the real one. */
  aliases?: ReadonlyMap<string, string>;
  /** Where the keys are explained, for the error's hint. */
  hint: string;
  /**
   * Keys sardinecake 0.4 read that mean nothing here, with the reason: a warning, not an error,
   * so that 0.4's files keep working.
   */
  ignored?: ReadonlyMap<string, string>;
}

/** Keys of sardinecake 0.4's `sarde` that sarde has no use for. */
const SARDE_IGNORED_KEYS: ReadonlyMap<string, string> = new Map([
  ["raw", "sarde has no --raw: images are always read from and written to the store"],
  ["no-run", "sarde has no --no-run"],
]);

/** Keys of sardinecake 0.4's executor that this executor has no use for. */
const EXECUTOR_IGNORED_KEYS: ReadonlyMap<string, string> = new Map([
  ["omit-backingstore", "job VMs always get their backing chain from the overlays"],
  ["verbosity", "0.4 ignored it in INI files too; use -v/-q in the runner's *_args"],
  ["no-run", "the executor has no --no-run"],
]);

/** Edit distance with adjacent transpositions (optimal string alignment), for suggestions. */
function editDistance(a: string, b: string): number {
  const d = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0][j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      d[i][j] = Math.min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
        d[i][j] = Math.min(d[i][j], d[i - 2][j - 2] + 1);
      }
    }
  }
  return d[a.length][b.length];
}

/** The candidate closest to `word`, if it is close enough to be a plausible typo. */
function closest(word: string, candidates: Iterable<string>): string | undefined {
  let best: string | undefined;
  let bestDistance = Math.max(1, Math.floor(word.length / 3)) + 1;
  for (const c of candidates) {
    const distance = editDistance(word, c);
    if (distance < bestDistance) [best, bestDistance] = [c, distance];
  }
  return best;
}

/**
 * Refuses sections and keys that `schema` does not know, naming `file:line` and the closest known
 * name: a misspelt key would otherwise be ignored silently (0.4 accepted anything).
 */
export function checkIni(data: IniData, schema: IniSchema): void {
  for (const [section, entries] of data.sections) {
    const keys = schema.sections.get(section) ?? schema.otherSections;
    if (!keys) {
      const at = data.headers.get(section)!;
      const known = [...schema.sections.keys()].filter((s) => s !== DEFAULT_SECTION);
      const guess = schema.aliases?.get(section) ?? closest(section, known);
      throw fail(
        "usage",
        `${at.file}:${at.line}: unknown section [${section}]` +
          (guess ? `; did you mean [${guess}]?` : ""),
        `sections: [${[DEFAULT_SECTION, ...known].join("], [")}]`,
      );
    }
    for (const [key, entry] of entries) {
      if (keys.includes(key)) continue;
      const ignored = schema.ignored?.get(key);
      if (ignored !== undefined) {
        warn(
          `${entry.file}:${entry.line}: '${key}' (a sardinecake 0.4 key) is ignored: ${ignored}`,
        );
        continue;
      }
      const guess = closest(key, keys);
      const elsewhere = [...schema.sections]
        .filter(([s, ks]) => s !== DEFAULT_SECTION && ks.includes(key))
        .map(([s]) => `[${s}]`);
      const why = guess
        ? `; did you mean '${guess}'?`
        : elsewhere.length
        ? ` (it is a key of ${elsewhere.join(", ")})`
        : "";
      throw fail(
        "usage",
        `${entry.file}:${entry.line}: unknown key '${key}' in [${section}]${why}`,
        schema.hint,
      );
    }
  }
}

/**
 * Reads the config files of a program: those named in `envVar` (which must all exist: a file
 * named on purpose and not there is a mistake), else `defaults` (usually absent); then checks them
 * against `schema`.
 */
async function loadConfig(
  envVar: string,
  defaults: readonly string[],
  schema: IniSchema,
): Promise<IniData> {
  const files = configFiles(envVar, defaults);
  const data = await loadIni(files);
  const missing = Deno.env.get(envVar) ? files.find((f) => !data.files.includes(f)) : undefined;
  if (missing !== undefined) {
    throw fail("usage", `config file ${missing} (named in $${envVar}) does not exist`);
  }
  checkIni(data, schema);
  return data;
}

/** A `sarde` command and the keys of its INI section (its long option names). */
export interface CommandKeys {
  name: string;
  aliases?: readonly string[];
  keys: readonly string[];
}

/**
 * The configuration of one `sarde` command: files from `$SARDE_CONF_FILES` or
 * {@link SARDE_CONF_FILES}, `[DEFAULT]` overridden by the command's section. Every section must
 * be `[DEFAULT]` or a command of `commands` and hold only its keys (`[DEFAULT]`: those of any
 * command). Command-line options are meant to override these values.
 */
export async function sardeConfig(
  command: string,
  commands: readonly CommandKeys[],
): Promise<Record<string, string>> {
  const sections = new Map(commands.map((c) => [c.name, c.keys]));
  sections.set(DEFAULT_SECTION, [...new Set(commands.flatMap((c) => c.keys))]);
  const aliases = new Map(commands.flatMap((c) => (c.aliases ?? []).map((a) => [a, c.name])));
  const data = await loadConfig("SARDE_CONF_FILES", SARDE_CONF_FILES, {
    sections,
    aliases,
    hint: "keys are the long options of the section's command (sarde <command> --help)",
    ignored: SARDE_IGNORED_KEYS,
  });
  return sectionValues(data, command);
}

/**
 * The executor's configuration: files from `$GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES` or
 * {@link EXECUTOR_CONF_FILES}; `[DEFAULT]` overridden by the section matching `image` (see
 * {@link imageSectionValues}), or `[DEFAULT]` alone without an image. Every section may hold the
 * {@link EXECUTOR_KEYS} and nothing else.
 */
export async function executorConfig(image?: string): Promise<Record<string, string>> {
  const data = await loadConfig("GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES", EXECUTOR_CONF_FILES, {
    sections: new Map([[DEFAULT_SECTION, EXECUTOR_KEYS]]),
    otherSections: EXECUTOR_KEYS,
    hint: "examples/gitlab-sardinecake-executor.ini documents every key",
    ignored: EXECUTOR_IGNORED_KEYS,
  });
  return image === undefined
    ? sectionValues(data, DEFAULT_SECTION)
    : imageSectionValues(data, image);
}
