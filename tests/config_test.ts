import assert from "node:assert/strict";
import { join } from "node:path";
import { buildProgram, commandKeys } from "../cli.ts";
import {
  configFiles,
  DEFAULT_SECTION,
  EXECUTOR_KEYS,
  executorConfig,
  expandHome,
  fnmatch,
  getBoolean,
  getDuration,
  getInt,
  getList,
  getPath,
  getSize,
  getString,
  imageSectionName,
  imageSectionValues,
  type IniData,
  loadIni,
  parseDuration,
  SARDE_CONF_FILES,
  sardeConfig,
  sectionValues,
} from "../lib/util/config.ts";
import { SardeError } from "../lib/util/errors.ts";

const examples = new URL("../examples/", import.meta.url).pathname;
/** The sections and keys of sarde's INI files, as cli.ts derives them from its options. */
const sardeKeys = commandKeys(buildProgram());

async function withEnv<T>(vars: Record<string, string | undefined>, fn: () => Promise<T> | T) {
  const old: Record<string, string | undefined> = {};
  for (const [k, v] of Object.entries(vars)) {
    old[k] = Deno.env.get(k);
    if (v === undefined) Deno.env.delete(k);
    else Deno.env.set(k, v);
  }
  try {
    return await fn();
  } finally {
    for (const [k, v] of Object.entries(old)) {
      v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
    }
  }
}

/** Writes each text to its own file in a fresh temp dir and loads them in order. */
async function load(...texts: string[]): Promise<{ data: IniData; files: string[] }> {
  const dir = await Deno.makeTempDir({ prefix: "sarde-config-" });
  const files = texts.map((_, i) => join(dir, `${i}.ini`));
  for (let i = 0; i < texts.length; i++) await Deno.writeTextFile(files[i], texts[i]);
  return { data: await loadIni(files), files };
}

function usageError(pattern: RegExp) {
  return (e: unknown) => {
    assert.ok(e instanceof SardeError, `not a SardeError: ${e}`);
    assert.equal(e.kind, "usage");
    assert.match(e.message, pattern);
    assert.ok(!e.message.includes("\n"), "one line");
    return true;
  };
}

Deno.test("config: [DEFAULT] is inherited; a command section overrides it", async () => {
  const { data } = await load(
    "[DEFAULT]\nconnect = qemu:///system\nocidir = /a/\n\n[export]\nocidir: /b/\n",
  );
  assert.deepEqual(sectionValues(data, "export"), { connect: "qemu:///system", ocidir: "/b/" });
  assert.deepEqual(sectionValues(data, "list"), { connect: "qemu:///system", ocidir: "/a/" });
  assert.deepEqual(sectionValues(data, DEFAULT_SECTION), {
    connect: "qemu:///system",
    ocidir: "/a/",
  });
});

Deno.test("config: a command's section never leaks into another command (0.4 bug)", async () => {
  // 0.4 registered export before import and clone, so `[export] ocidir` changed them too.
  const { data } = await load("[export]\nocidir = /export/\nchunksize = 4M\n[pull]\nname = x\n");
  assert.deepEqual(sectionValues(data, "import"), {});
  assert.deepEqual(sectionValues(data, "clone"), {});
  assert.deepEqual(sectionValues(data, "push"), {});
  assert.equal(getString(sectionValues(data, "export"), "ocidir"), "/export/");
});

Deno.test("config: later files override earlier ones key by key; missing files ignored", async () => {
  const { data, files } = await load(
    "[DEFAULT]\nconnect = qemu:///system\nvmdir = /one/\n[list]\nformat = text\n",
    "[DEFAULT]\nvmdir = /two/\n[list]\nformat = json\n",
  );
  const withMissing = await loadIni([files[0], "/nonexistent/sarde.ini", files[1], "/etc/x/y/z"]);
  for (const d of [data, withMissing]) {
    assert.deepEqual(sectionValues(d, "list"), {
      connect: "qemu:///system",
      vmdir: "/two/",
      format: "json",
    });
  }
  assert.deepEqual(withMissing.files, files);
  assert.deepEqual((await loadIni([])).sections.size, 0);
});

Deno.test("config: keys are case-insensitive and '-' equals '_'", async () => {
  const { data } = await load(
    "[DEFAULT]\nPrint_UUID = yes\n[pull]\nCHUNK_SIZE = 4MiB\nallow-host-resources = on\n",
    "[pull]\nprint-uuid = no\n",
  );
  const v = sectionValues(data, "pull");
  assert.deepEqual(Object.keys(v).sort(), ["allow-host-resources", "chunk-size", "print-uuid"]);
  assert.equal(getBoolean(v, "print_uuid"), false);
  assert.equal(getBoolean(v, "PRINT-UUID"), false);
  assert.equal(getSize(v, "chunk_size"), 4 << 20);
  assert.equal(getBoolean(v, "allow_host_resources"), true);
});

Deno.test("config: dialect details (comments, ':', continuation, %%, whitespace, BOM)", async () => {
  const { data } = await load(
    "\uFEFF# comment\n; another\n[DEFAULT]\n  connect:qemu+ssh://h/system  \n" +
      "password = 50%%off # not a comment\nrate = 5%\nmulti = first\n  second\n# inside\n  third\n" +
      "empty =\n[ list ]\nformat = json\r\n",
  );
  const v = sectionValues(data, "list");
  assert.equal(v.connect, "qemu+ssh://h/system");
  assert.equal(v.password, "50%off # not a comment");
  assert.equal(v.rate, "5%");
  assert.equal(v.multi, "first\nsecond\nthird");
  assert.equal(v.empty, "");
  assert.equal(v.format, "json");
});

Deno.test("config: booleans, sizes, integers are typed (raw=false is false)", async () => {
  const { data } = await load(
    "[DEFAULT]\nraw = false\ninsecure = YES\ntls-verify = 0\nforce = off\n" +
      "chunksize = 1000000\nkeep-bytes = 256 MiB\nverbose = 2\nquiet = -1\n",
  );
  const v = sectionValues(data, "export");
  assert.equal(getBoolean(v, "raw"), false);
  assert.equal(getBoolean(v, "insecure"), true);
  assert.equal(getBoolean(v, "tls-verify"), false);
  assert.equal(getBoolean(v, "force"), false);
  assert.equal(getBoolean(v, "print-uuid"), undefined);
  assert.equal(getBoolean(v, "print-uuid", true), true);
  const chunk = getSize(v, "chunksize");
  assert.equal(chunk, 1000000);
  assert.ok(Number.isInteger(chunk));
  assert.equal(getSize(v, "keep-bytes"), 268435456);
  assert.equal(getSize(v, "chunk-size", 7), 7);
  assert.equal(getInt(v, "verbose"), 2);
  assert.equal(getInt(v, "quiet"), -1);
  assert.equal(getInt(v, "concurrency", 4), 4);
  assert.equal(getString(v, "constructor"), undefined, "no prototype keys");
});

Deno.test("config: an empty value means 'not set' for typed getters", async () => {
  const { data } = await load("[DEFAULT]\nchunksize = 4M\n[push]\nchunksize =\n");
  const v = sectionValues(data, "push");
  assert.equal(getSize(v, "chunksize"), undefined);
  assert.equal(getSize(v, "chunksize", 1), 1);
  assert.equal(getString(v, "chunksize"), "");
});

Deno.test("config: bad values give one-line errors naming file, line, section and key", async () => {
  const { data, files } = await load(
    "[DEFAULT]\nraw = maybe\n[export]\n\nchunksize = 12 parsecs\nverbose = 1.5\ntimeout = soon\n",
  );
  const v = sectionValues(data, "export");
  assert.throws(
    () => getBoolean(v, "raw"),
    usageError(new RegExp(`^${files[0]}:2: \\[DEFAULT\\] raw = 'maybe': expected true or false`)),
  );
  assert.throws(
    () => getSize(v, "chunksize"),
    usageError(
      new RegExp(`^${files[0]}:5: \\[export\\] chunksize = '12 parsecs': expected a size`),
    ),
  );
  assert.throws(() => getInt(v, "verbose"), usageError(/:6: \[export\] verbose = '1.5'/));
  assert.throws(() => getDuration(v, "timeout"), usageError(/:7: \[export\] timeout = 'soon'/));
  // Records not made by sectionValues still get the key named.
  assert.throws(() => getBoolean({ raw: "x" }, "raw"), usageError(/config key 'raw'/));
});

Deno.test("config: ~ expansion in paths keeps a trailing slash", async () => {
  await withEnv({ HOME: "/home/sardine" }, async () => {
    const { data } = await load(
      "[DEFAULT]\nocidir = ~/share/OCI/\nvmdir = ~\nclonedir = /dev/shm/x/\nother = ~bob/x\n",
    );
    const v = sectionValues(data, "pull");
    assert.equal(getPath(v, "ocidir"), "/home/sardine/share/OCI/");
    assert.equal(getPath(v, "vmdir"), "/home/sardine");
    assert.equal(getPath(v, "clonedir"), "/dev/shm/x/");
    assert.equal(getPath(v, "other"), "~bob/x", "~user is not expanded");
    assert.equal(getPath(v, "authfile"), undefined);
    assert.equal(expandHome("~/"), "/home/sardine/");
  });
});

Deno.test("config: durations are milliseconds; a plain number is seconds", () => {
  assert.equal(parseDuration("60"), 60_000);
  assert.equal(parseDuration("0.5"), 500);
  assert.equal(parseDuration("30s"), 30_000);
  assert.equal(parseDuration("5m"), 300_000);
  assert.equal(parseDuration("250ms"), 250);
  assert.equal(parseDuration("2h"), 7_200_000);
  assert.equal(parseDuration("1d"), 86_400_000);
  assert.equal(parseDuration("1h30m"), 5_400_000);
  assert.equal(parseDuration("1.5 hours"), 5_400_000);
  assert.equal(parseDuration("2 Weeks"), 14 * 86_400_000);
  for (const bad of ["", "s", "5 parsecs", "-5s", "5s x", "1e3"]) {
    assert.throws(() => parseDuration(bad), SardeError, bad);
  }
  assert.equal(getDuration({ timeout: "60" }, "timeout"), 60_000);
  assert.equal(getDuration({}, "timeout", 30_000), 30_000);
});

Deno.test("config: lists split on commas and whitespace", () => {
  assert.deepEqual(getList({ a: "x/*, y/*  z" }, "a"), ["x/*", "y/*", "z"]);
  assert.deepEqual(getList({ a: "" }, "a"), []);
  assert.equal(getList({}, "a"), undefined);
  assert.deepEqual(getList({}, "a", ["if-not-present"]), ["if-not-present"]);
});

Deno.test("config: dotted image sections stay whole (the ini package would nest them)", async () => {
  const { data } = await load(
    "[DEFAULT]\ntimeout = 30\nusername = vagrant\n" +
      "[registry.example.org:5000/sardines/debian:latest]\ntimeout = 60\n" +
      "[registry.example.org:5000/sardines/*]\ntimeout = 90\nusername = other\n",
  );
  assert.ok(data.sections.has("registry.example.org:5000/sardines/debian:latest"));
  assert.deepEqual(
    imageSectionValues(data, "registry.example.org:5000/sardines/debian:latest"),
    { timeout: "60", username: "vagrant" },
    "exact match beats a matching pattern, and [DEFAULT] is inherited",
  );
  assert.deepEqual(imageSectionValues(data, "registry.example.org:5000/sardines/alpine:3"), {
    timeout: "90",
    username: "other",
  });
  assert.deepEqual(imageSectionValues(data, "docker.io/library/debian:latest"), {
    timeout: "30",
    username: "vagrant",
  });
});

Deno.test("config: the longest matching pattern wins; ties go to the first section", async () => {
  const { data } = await load(
    "[*]\nn = star\n[reg/sar*]\nn = short\n[reg/sardines/deb?an*]\nn = long\n" +
      "[reg/sardines/[!d]*]\nn = set\n[reg/xyz/a*]\nn = tie1\n[reg/xyz/*b]\nn = tie2\n",
  );
  const n = (image: string) => getString(imageSectionValues(data, image), "n");
  assert.equal(n("reg/sardines/debian:12"), "long");
  assert.equal(n("reg/sardines/windows:11"), "set");
  assert.equal(n("reg/sarx"), "short");
  assert.equal(n("other"), "star");
  assert.equal(n("reg/xyz/ab"), "tie1");
  assert.equal(imageSectionName(data, "reg/sardines/debian:12"), "reg/sardines/deb?an*");
  assert.equal(imageSectionName(data, DEFAULT_SECTION), "*", "[DEFAULT] itself is never chosen");
  const { data: none } = await load("[DEFAULT]\nx = 1\n[a/*]\nx = 2\n");
  assert.equal(imageSectionName(none, "b/c"), undefined);
  assert.deepEqual(imageSectionValues(none, "b/c"), { x: "1" });
});

Deno.test("config: fnmatch follows Python's rules", () => {
  assert.ok(fnmatch("a/*", "a/b/c"), "* crosses /");
  assert.ok(fnmatch("a?c", "abc"));
  assert.ok(!fnmatch("a?c", "ac"));
  assert.ok(fnmatch("[ab]x", "bx"));
  assert.ok(fnmatch("[!ab]x", "cx"));
  assert.ok(!fnmatch("[!ab]x", "ax"));
  assert.ok(fnmatch("[]]", "]"));
  assert.ok(fnmatch("[!]]", "x") && !fnmatch("[!]]", "]"));
  assert.ok(fnmatch("[a-c]", "b"));
  assert.ok(fnmatch("[", "["), "unclosed [ is literal");
  assert.ok(fnmatch("a.b+c(d)", "a.b+c(d)"), "regex characters are literal");
  assert.ok(!fnmatch("a.b", "axb"));
  assert.ok(!fnmatch("Debian", "debian"), "case-sensitive");
  assert.ok(!fnmatch("[z-a]", "q"), "reversed range matches nothing");
  assert.ok(fnmatch("[\\]x", "\\x"), "backslash in a set is literal");
});

Deno.test("config: malformed files are usage errors with file and line", async () => {
  const cases: [string, RegExp][] = [
    ["[DEFAULT]\nconnect = x\njust words\n", /:3: expected 'key = value' or '\[section\]'/],
    ["# c\nconnect = x\n", /:2: 'connect' is outside any section/],
    ["[DEFAULT]\n= x\n", /:2: missing key name/],
    [
      "[DEFAULT]\na = 1\n[x]\nb = 2\n[DEFAULT]\nA = 3\n",
      /:6: 'a' is set twice in \[DEFAULT\] \(first on line 2\)/,
    ],
    ["[list]\nprint_uuid = 1\nprint-uuid = 0\n", /:3: 'print-uuid' is set twice/],
    ["[ ]\n", /:1: empty section name/],
  ];
  for (const [text, pattern] of cases) {
    const dir = await Deno.makeTempDir({ prefix: "sarde-config-" });
    const file = join(dir, "bad.ini");
    await Deno.writeTextFile(file, text);
    await assert.rejects(loadIni([file]), usageError(new RegExp(file + pattern.source)));
  }
});

Deno.test("config: an unreadable file is a usage error naming it", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sarde-config-" });
  // A directory exists but cannot be read as a file.
  await assert.rejects(loadIni([dir]), usageError(new RegExp(`cannot read config file ${dir}`)));
});

Deno.test("config: SARDE_CONF_FILES replaces the defaults; ~ is expanded", async () => {
  await withEnv({ HOME: "/home/s", SARDE_CONF_FILES: undefined }, () => {
    assert.deepEqual(configFiles("SARDE_CONF_FILES", SARDE_CONF_FILES), [
      "/etc/sardinecake/sarde.ini",
      "/home/s/.config/sardinecake/sarde.ini",
    ]);
  });
  await withEnv({ HOME: "/home/s", SARDE_CONF_FILES: "" }, () => {
    assert.equal(configFiles("SARDE_CONF_FILES", SARDE_CONF_FILES).length, 2, "empty = unset");
  });
  await withEnv({ HOME: "/home/s", SARDE_CONF_FILES: "~/a.ini::/b.ini" }, () => {
    assert.deepEqual(configFiles("SARDE_CONF_FILES", SARDE_CONF_FILES), [
      "/home/s/a.ini",
      "/b.ini",
    ]);
  });

  const { files } = await load(
    "[DEFAULT]\nocidir = /first/\n[list]\nformat = json\n",
    "[list]\nocidir = ~/second/\n",
  );
  await withEnv({ HOME: "/home/s", SARDE_CONF_FILES: files.join(":") }, async () => {
    const list = await sardeConfig("list", sardeKeys);
    assert.deepEqual(list, { ocidir: "~/second/", format: "json" });
    assert.equal(getPath(list, "ocidir"), "/home/s/second/");
    assert.deepEqual(await sardeConfig("pull", sardeKeys), { ocidir: "/first/" });
  });
});

Deno.test("config: a file named in the environment must exist (the defaults need not)", async () => {
  const { files } = await load("[DEFAULT]\nocidir = /first/\n");
  await withEnv({ SARDE_CONF_FILES: `${files[0]}:/missing/sarde.ini` }, async () => {
    await assert.rejects(
      sardeConfig("list", sardeKeys),
      usageError(
        /^config file \/missing\/sarde\.ini \(named in \$SARDE_CONF_FILES\) does not exist/,
      ),
    );
  });
  await withEnv({ GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES: "/missing/executor.ini" }, async () => {
    await assert.rejects(
      executorConfig(),
      usageError(/^config file \/missing\/executor\.ini \(named in \$GITLAB_SARDINECAKE_/),
    );
  });
  await withEnv({ HOME: "/nonexistent", SARDE_CONF_FILES: undefined }, async () => {
    assert.deepEqual(await sardeConfig("list", sardeKeys), {}, "missing default files are fine");
  });
});

/** Loads `text` as the only file of `$envVar` and expects `read` to fail with `pattern`. */
async function refused(
  envVar: string,
  text: string,
  read: () => Promise<unknown>,
  pattern: RegExp,
): Promise<void> {
  const { files } = await load(text);
  await withEnv({ [envVar]: files[0] }, async () => {
    await assert.rejects(read(), usageError(new RegExp(`^${files[0]}${pattern.source}`)));
  });
}

Deno.test("config: an unknown executor key is an error with file:line and the closest key", async () => {
  const read = () => executorConfig("registry.example.org/sardines/debian:12");
  const env = "GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES";
  // The typo that silently turned the allow-list off.
  await refused(
    env,
    "[DEFAULT]\ntimeout = 60s\nallowed-image = registry.example.org/sardines/*\n",
    read,
    /:3: unknown key 'allowed-image' in \[DEFAULT\]; did you mean 'allowed-images'\?/,
  );
  // Image sections are patterns (any name), but their keys are checked too, in every section.
  await refused(
    env,
    "[DEFAULT]\ntimeout = 60s\n[other/*]\n\nTimout = 2m\n",
    read,
    /:5: unknown key 'timout' in \[other\/\*\]; did you mean 'timeout'\?/,
  );
  await refused(env, "[x]\nbogus = 1\n", read, /:2: unknown key 'bogus' in \[x\]$/);
});

Deno.test("config: sarde refuses unknown sections and keys, naming file:line and a suggestion", async () => {
  const env = "SARDE_CONF_FILES";
  const read = () => sardeConfig("list", sardeKeys);
  await refused(
    env,
    "[DEFAULT]\n[lsit]\n",
    read,
    /:2: unknown section \[lsit\]; did you mean \[list\]\?/,
  );
  // An alias is not a section: `sarde ls` reads [list].
  await refused(
    env,
    "[ls]\nformat = json\n",
    read,
    /:1: unknown section \[ls\]; did you mean \[list\]\?/,
  );
  await refused(env, "[x-files]\n", read, /:1: unknown section \[x-files\]$/);
  // Another command's section is checked too, not only the one being run.
  await refused(
    env,
    "[list]\nformat = json\n[pull]\nconcurency = 2\n",
    read,
    /:4: unknown key 'concurency' in \[pull\]; did you mean 'concurrency'\?/,
  );
  // chunksize (export) and chunk-size (uploads) are different keys.
  await refused(
    env,
    "[push]\nchunksize = 4MiB\n",
    read,
    /:2: unknown key 'chunksize' in \[push\]; did you mean 'chunk-size'\?/,
  );
  await refused(
    env,
    "[list]\nconcurrency = 8\n",
    read,
    /:2: unknown key 'concurrency' in \[list\] \(it is a key of \[fetch\], \[push\], \[export\], \[pull\], \[clone\]\)/,
  );
  await refused(env, "[DEFAULT]\nversion = 1\n", read, /:2: unknown key 'version'/);
  // [DEFAULT] takes the keys of any command, and -v/-q everywhere.
  const { files } = await load(
    "[DEFAULT]\nconcurrency = 8\nformat = json\nzstd-level = 3\nverbose = 1\n" +
      "[list]\nquiet = 1\n[export]\nchunk-size = 4MiB\n",
  );
  await withEnv({ SARDE_CONF_FILES: files[0] }, async () => {
    assert.equal(getString(await sardeConfig("list", sardeKeys), "quiet"), "1");
  });
});

Deno.test("config: keys of sardinecake 0.4 that mean nothing here are ignored, not errors", async () => {
  // 0.4's own example files and docs use these; refusing them would break working setups.
  const sarde04 = await load("[DEFAULT]\nraw = false\n[import]\nno_run = 1\nprint_uuid = true\n");
  await withEnv({ SARDE_CONF_FILES: sarde04.files[0] }, async () => {
    assert.equal(getBoolean(await sardeConfig("import", sardeKeys), "print-uuid"), true);
  });
  const executor04 = await load("[DEFAULT]\nverbosity = 2\n[x/*]\nomit_backingstore = yes\n");
  await withEnv({ GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES: executor04.files[0] }, async () => {
    await executorConfig("x/y");
  });
});

Deno.test("config: EXECUTOR_KEYS has every key lib/executor/stages.ts reads", async () => {
  const source = await Deno.readTextFile(new URL("../lib/executor/stages.ts", import.meta.url));
  const read = [...source.matchAll(/\bget[A-Z]\w*\(ini, "([^"]+)"/g)].map((m) => m[1]);
  assert.ok(read.length >= 20, `found only ${read}`);
  for (const key of read) assert.ok(EXECUTOR_KEYS.includes(key), key);
  for (const key of ["response-timeout", "retry-timeout"]) assert.ok(EXECUTOR_KEYS.includes(key));
});

Deno.test("config: the example sarde.ini parses, and its documented keys have their types", async () => {
  const data = await loadIni([join(examples, "sarde.ini")]);
  assert.deepEqual(sectionValues(data, "export"), {}, "everything is commented out");
  // The same file with every `#key = value` line switched on must still parse and type-check.
  const text = (await Deno.readTextFile(join(examples, "sarde.ini")))
    .replace(/^#([a-z][a-z_.-]* ?= ?.*)$/gm, "$1");
  const { data: on, files } = await load(text);
  await withEnv({ SARDE_CONF_FILES: files[0] }, async () => {
    // Every documented key is a known key of its section.
    for (const { name } of sardeKeys) await sardeConfig(name, sardeKeys);
  });
  // And every key of every command is documented, in [DEFAULT] or in the command's section.
  for (const { name, keys } of sardeKeys) {
    const documented = sectionValues(on, name);
    const missing = keys.filter((k) => !(k in documented));
    assert.deepEqual(missing, [], `[${name}] keys missing in examples/sarde.ini`);
  }
  await withEnv({ HOME: "/home/s" }, () => {
    const d = sectionValues(on, DEFAULT_SECTION);
    for (
      const key of ["connect", "ocidir", "vmdir", "verbose", "quiet", "authfile", "insecure"]
    ) assert.ok(key in d, key);
    assert.equal(getPath(d, "ocidir"), "/home/s/share/sardinecake/OCI/");
    assert.equal(getInt(d, "verbose"), 0);
    assert.equal(getBoolean(d, "insecure"), false);
    assert.equal(getBoolean(d, "tls-verify"), true);
    assert.equal(getInt(d, "concurrency"), 4);
    assert.equal(getSize(d, "chunk-size"), 4 << 20);
    assert.equal(getDuration(d, "response-timeout"), 30_000);
    assert.equal(getDuration(d, "retry-timeout"), 120_000);
    const exp = sectionValues(on, "export");
    assert.equal(getSize(exp, "chunksize"), 64 << 20);
    assert.equal(getString(exp, "compression"), "zstd");
    assert.equal(getBoolean(exp, "force"), false);
    const imp = sectionValues(on, "import");
    assert.equal(getBoolean(imp, "allow-host-resources"), false);
    assert.equal(getString(imp, "domain-type"), "kvm");
    assert.equal(getBoolean(imp, "force"), undefined, "[export] force does not leak");
    assert.equal(getPath(exp, "ocidir"), "/home/s/share/sardinecake/OCIexport/");
    assert.equal(getPath(sectionValues(on, "import"), "ocidir"), "/home/s/share/sardinecake/OCI/");
    assert.equal(getString(sectionValues(on, "list"), "format"), "text");
    assert.equal(getBoolean(sectionValues(on, "pull"), "print-uuid"), false);
    const prune = sectionValues(on, "prune");
    assert.equal(getDuration(prune, "older-than"), 30 * 86_400_000);
    assert.equal(getSize(prune, "keep-bytes"), 100 * 2 ** 30);
  });
});

Deno.test("config: the example executor ini parses, with image sections", async () => {
  const file = join(examples, "gitlab-sardinecake-executor.ini");
  await withEnv(
    { HOME: "/home/runner", GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES: file },
    async () => {
      const d = await executorConfig();
      assert.equal(getString(d, "connect"), "qemu:///system");
      assert.equal(getPath(d, "ocidir"), "/home/runner/share/sardinecake/OCI/");
      assert.equal(getDuration(d, "timeout"), 60_000);

      const deb = await executorConfig("registry.example.org/sardines/debian:latest");
      assert.equal(getDuration(deb, "timeout"), 120_000);
      assert.equal(
        getPath(deb, "prepare-script"),
        "/home/runner/share/sardinecake/scripts/prepare-debian.sh",
      );
      const old = await executorConfig("registry.example.org/sardines/debian:11");
      assert.match(getString(old, "prepare-script")!, /prepare-debian-old\.sh$/);
      assert.equal(getDuration(old, "timeout"), 60_000);
      const win = await executorConfig("registry.example.org/sardines/windows:11");
      assert.equal(getDuration(win, "timeout"), 600_000);
      assert.equal(getString(win, "username"), "gitlab");
      assert.equal(
        getDuration(await executorConfig("registry.example.org/sardines/x"), "timeout"),
        90_000,
      );
      assert.equal(getString(await executorConfig("elsewhere/img"), "username"), undefined);
    },
  );

  // Every documented key, switched on, has the documented type.
  const text = (await Deno.readTextFile(file)).replace(/^#([a-z][a-z_.-]* ?= ?.*)$/gm, "$1");
  const { data, files } = await load(text);
  await withEnv({ GITLAB_SARDINECAKE_EXECUTOR_CONF_FILES: files[0] }, async () => {
    // Every documented key is known, in [DEFAULT] and in the image sections.
    await executorConfig("registry.example.org/sardines/windows:11");
  });
  const d = sectionValues(data, DEFAULT_SECTION);
  for (const key of EXECUTOR_KEYS) assert.ok(key in d, `${key} is documented`);
  assert.deepEqual(getList(d, "pull-policy"), ["if-not-present", "always"]);
  assert.deepEqual(getList(d, "allowed-images"), [
    "registry.example.org/sardines/*",
    "registry.example.org/vms/*",
  ]);
  assert.equal(getDuration(d, "max-job-age"), 86_400_000);
  assert.ok(["user", "default"].includes(getString(d, "network")!));
  assert.ok(["kvm", "qemu"].includes(getString(d, "domain-type")!));
  assert.equal(getString(d, "clonedir"), "/dev/shm/sardinecake/");
});
