/**
 * containers-registries.conf(5) parsing and resolution: which files are read, longest-prefix
 * matching (also `*.domain` wildcards), location rewriting, `pull-from-mirror`, blocked entries,
 * and one-line errors for broken files.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  findRegistry,
  loadRegistriesConf,
  parseRegistriesConf,
  prefixMatch,
  type RegistriesConf,
  resolvePullSources,
  resolvePushTarget,
} from "../lib/registry/registries_conf.ts";
import { formatReference, parseReference } from "../lib/oci/reference.ts";
import { SardeError } from "../lib/util/errors.ts";

const conf = (text: string): RegistriesConf => ({
  registries: parseRegistriesConf(text, "test.conf"),
  files: ["test.conf"],
});

const sources = (c: RegistriesConf, ref: string) =>
  resolvePullSources(c, parseReference(ref)).map((s) =>
    `${s.mirror ? "mirror" : "primary"} ${formatReference(s.reference)}${
      s.insecure ? " insecure" : ""
    }`
  );

/** The SardeError `fn` throws (synchronously or not). */
async function thrown(fn: () => unknown): Promise<SardeError> {
  try {
    await fn();
  } catch (err) {
    assert.ok(err instanceof SardeError, String(err));
    return err;
  }
  throw new Error("nothing thrown");
}

const DIGEST = "sha256:" + "ab".repeat(32);

Deno.test("prefixMatch: whole path components, and *.domain wildcards on the host only", () => {
  assert.deepEqual(prefixMatch("example.com/foo/bar:1", "example.com/foo"), 15);
  assert.deepEqual(prefixMatch("example.com/foobar:1", "example.com/foo"), -1);
  assert.deepEqual(prefixMatch("example.com/foo@" + DIGEST, "example.com/foo"), 15);
  assert.deepEqual(prefixMatch("a.example.com/x:1", "*.example.com"), 13);
  assert.deepEqual(prefixMatch("example.com/x:1", "*.example.com"), -1);
  assert.deepEqual(prefixMatch("other.org/a.example.com/x", "*.example.com"), -1);
});

Deno.test("a *.domain wildcard prefix with a path or port is refused, as containers/image does", () => {
  for (const prefix of ["*.example.com/foo", "*.example.com:5000"]) {
    assert.throws(
      () => conf(`[[registry]]\nprefix = "${prefix}"\nlocation = "example.com"\n`),
      /a \*\.domain wildcard is a host name only/,
    );
  }
});

Deno.test("findRegistry: an exact host beats *.domain in either order; hosts match in any case", () => {
  for (
    const entries of [
      [
        '[[registry]]\nprefix = "*.example.com"\nlocation = "example.com"\n[[registry.mirror]]\nlocation = "cache.lan:5000"\n',
        '[[registry]]\nlocation = "evil.example.com"\nblocked = true\n',
      ],
    ]
  ) {
    for (const text of [entries.join("\n"), [...entries].reverse().join("\n")]) {
      const c = conf(text);
      for (const ref of ["evil.example.com/x/y:1", "EVIL.Example.COM/x/y:1"]) {
        assert.equal(findRegistry(c, parseReference(ref))?.blocked, true, `${ref} in\n${text}`);
        assert.throws(() => resolvePullSources(c, parseReference(ref)), /is blocked/);
      }
      assert.equal(
        findRegistry(c, parseReference("good.example.com/x:1"))?.prefix,
        "*.example.com",
      );
    }
  }
});

Deno.test("resolvePullSources: longest prefix wins, mirrors first, location rewrites", () => {
  const c = conf(`
unqualified-search-registries = ["docker.io"]
short-name-mode = "enforcing"
[aliases]
"debian" = "docker.io/library/debian"

[[registry]]
location = "ghcr.io"
[[registry.mirror]]
location = "cache.local:5000/ghcr"
insecure = true

[[registry]]
prefix = "ghcr.io/sardines"
location = "ghcr.io/sardines"
[[registry.mirror]]
location = "cache-a.local/s"
[[registry.mirror]]
location = "cache-b.local/s"
`);
  assert.deepEqual(sources(c, "ghcr.io/sardines/debian:12"), [
    "mirror cache-a.local/s/debian:12",
    "mirror cache-b.local/s/debian:12",
    "primary ghcr.io/sardines/debian:12",
  ]);
  assert.deepEqual(sources(c, "ghcr.io/other/x:1"), [
    "mirror cache.local:5000/ghcr/other/x:1 insecure",
    "primary ghcr.io/other/x:1",
  ]);
  assert.deepEqual(sources(c, "quay.io/a/b:1"), ["primary quay.io/a/b:1"]);
});

Deno.test("resolvePullSources: prefix and location differ, and wildcard prefixes", () => {
  const c = conf(`
[[registry]]
prefix = "example.com/images"
location = "registry.internal:8443/mirror/images"
insecure = true

[[registry]]
prefix = "*.corp.example"
[[registry.mirror]]
location = "cache.corp.example/all"
`);
  assert.deepEqual(sources(c, "example.com/images/vm:1"), [
    "primary registry.internal:8443/mirror/images/vm:1 insecure",
  ]);
  assert.deepEqual(sources(c, "git.corp.example/team/vm:2"), [
    "mirror cache.corp.example/all/team/vm:2",
    "primary git.corp.example/team/vm:2",
  ]);
});

Deno.test("resolvePullSources: pull-from-mirror and mirror-by-digest-only pick the mirrors", () => {
  const c = conf(`
[[registry]]
location = "r.example"
[[registry.mirror]]
location = "all.example"
[[registry.mirror]]
location = "digests.example"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "tags.example"
pull-from-mirror = "tag-only"

[[registry]]
location = "old.example"
mirror-by-digest-only = true
[[registry.mirror]]
location = "oldmirror.example"
`);
  assert.deepEqual(sources(c, "r.example/a:1"), [
    "mirror all.example/a:1",
    "mirror tags.example/a:1",
    "primary r.example/a:1",
  ]);
  assert.deepEqual(sources(c, `r.example/a@${DIGEST}`), [
    `mirror all.example/a@${DIGEST}`,
    `mirror digests.example/a@${DIGEST}`,
    `primary r.example/a@${DIGEST}`,
  ]);
  assert.deepEqual(sources(c, "old.example/a:1"), ["primary old.example/a:1"]);
  assert.deepEqual(sources(c, `old.example/a@${DIGEST}`), [
    `mirror oldmirror.example/a@${DIGEST}`,
    `primary old.example/a@${DIGEST}`,
  ]);
});

Deno.test("blocked entries refuse pulls and pushes with a usage error (exit 2)", async () => {
  const c = conf(`
[[registry]]
prefix = "evil.example"
location = "evil.example"
blocked = true

[[registry]]
prefix = "evil.example/allowed"
location = "evil.example/allowed"
insecure = true
`);
  for (const resolve of [resolvePullSources, resolvePushTarget]) {
    const err = await thrown(() => resolve(c, parseReference("evil.example/x:1")));
    assert.match(err.message, /^registry evil\.example is blocked in test\.conf/);
    assert.deepEqual(err.exitCode, 2);
  }
  // A longer, unblocked prefix wins (containers/image's rule).
  assert.deepEqual(sources(c, "evil.example/allowed/x:1"), [
    "primary evil.example/allowed/x:1 insecure",
  ]);
  const push = resolvePushTarget(c, parseReference("evil.example/allowed/x:1"));
  assert.deepEqual([formatReference(push.reference), push.insecure], [
    "evil.example/allowed/x:1",
    true,
  ]);
});

Deno.test("broken files: one-line usage errors naming the file", async () => {
  const cases: [string, RegExp][] = [
    ["[[registry]\nlocation = 1", /^test\.conf: not valid TOML: line 1/],
    ['[registries.search]\nregistries = ["docker.io"]', /version 1 format/],
    ["[[registry]]\ninsecure = true", /both location and prefix are unset/],
    ['[[registry]]\nlocation = "https://r.example"', /must not name a scheme/],
    ['[[registry]]\nlocation = "r.example"\ninsecure = "yes"', /insecure must be true or false/],
    ['[[registry]]\nprefix = "r.example/x"', /location is unset/],
    [
      '[[registry]]\nlocation = "r.example"\n[[registry.mirror]]\nlocation = "m"\npull-from-mirror = "some"',
      /pull-from-mirror 'some' is not one of/,
    ],
    [
      '[[registry]]\nlocation = "r.example"\n[[registry.mirror]]\ninsecure = true',
      /mirror #1: location is unset/,
    ],
    [
      '[[registry]]\nlocation = "r.example"\nmirror-by-digest-only = true\n[[registry.mirror]]\nlocation = "m"\npull-from-mirror = "all"',
      /both set/,
    ],
    [
      '[[registry]]\nlocation = "r.example"\n[[registry]]\nprefix = "r.example/team"\nlocation = "r.example"\nblocked = true',
      /registry 'r.example' is listed twice with conflicting 'blocked' settings/,
    ],
    [
      '[[registry]]\nprefix = "a.example"\nlocation = "r.example"\ninsecure = true\n[[registry]]\nlocation = "r.example"',
      /registry 'r.example' is listed twice with conflicting 'insecure' settings/,
    ],
  ];
  for (const [text, re] of cases) {
    const err = await thrown(() => parseRegistriesConf(text, "test.conf"));
    assert.match(err.message, re, JSON.stringify(text));
    assert.ok(err.message.startsWith("test.conf: "), err.message);
    assert.ok(!err.message.includes("\n"), err.message);
    assert.deepEqual(err.exitCode, 2);
  }
});

Deno.test("parseRegistriesConf: within one file the first entry of a prefix wins", () => {
  const entries = parseRegistriesConf(
    [
      '[[registry]]\nprefix = "r.example"\nlocation = "first.example"',
      '[[registry]]\nprefix = "r.example"\nlocation = "second.example"',
      '[[registry]]\nprefix = "r.example/team"\nlocation = "first.example"',
    ].join("\n"),
    "test.conf",
  );
  assert.deepEqual(
    entries.map((e) => [e.prefix, e.location]),
    [["r.example", "first.example"], ["r.example/team", "first.example"]],
  );
});

Deno.test("loadRegistriesConf: main file, drop-ins in name order, later prefixes replace earlier", async () => {
  const dir = await Deno.makeTempDir({ prefix: "sarde-regconf-" });
  const saved = ["CONTAINERS_REGISTRIES_CONF", "SARDE_REGISTRIES_CONF_DIR", "HOME"].map((
    k,
  ) => [k, Deno.env.get(k)] as const);
  try {
    const dropins = join(dir, "registries.conf.d");
    await Deno.mkdir(dropins);
    await Deno.mkdir(join(dropins, "sub.conf")); // folders are ignored
    const main = join(dir, "registries.conf");
    await Deno.writeTextFile(
      main,
      '[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "m1.example"\n' +
        '[[registry]]\nlocation = "b.example"\n',
    );
    await Deno.writeTextFile(
      join(dropins, "20-b.conf"),
      '[[registry]]\nlocation = "a.example"\nblocked = true\n',
    );
    await Deno.writeTextFile(
      join(dropins, "10-a.conf"),
      '[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "m2.example"\n',
    );
    await Deno.writeTextFile(join(dropins, "ignored.txt"), "not toml at all [[[");
    Deno.env.set("SARDE_REGISTRIES_CONF_DIR", dropins);
    Deno.env.set("HOME", dir);
    Deno.env.delete("CONTAINERS_REGISTRIES_CONF");

    const c = await loadRegistriesConf({ file: main });
    assert.deepEqual(c.files, [main, join(dropins, "10-a.conf"), join(dropins, "20-b.conf")]);
    assert.deepEqual(findRegistry(c, parseReference("a.example/x:1"))?.blocked, true);
    assert.deepEqual(findRegistry(c, parseReference("b.example/x:1"))?.location, "b.example");

    // $CONTAINERS_REGISTRIES_CONF replaces the main file; the option wins over it.
    const other = join(dir, "other.conf");
    await Deno.writeTextFile(other, '[[registry]]\nlocation = "c.example"\n');
    Deno.env.set("CONTAINERS_REGISTRIES_CONF", other);
    assert.deepEqual((await loadRegistriesConf()).files[0], other);
    assert.deepEqual((await loadRegistriesConf({ file: main })).files[0], main);

    // A named file must exist; the default one may be missing.
    assert.match(
      (await thrown(() => loadRegistriesConf({ file: join(dir, "missing.conf") }))).message,
      /missing\.conf does not exist/,
    );
    Deno.env.delete("CONTAINERS_REGISTRIES_CONF");
    Deno.env.set("SARDE_REGISTRIES_CONF_DIR", join(dir, "none"));
    // The user's file replaces the system one when it exists (HOME is the temp dir here).
    await Deno.mkdir(join(dir, ".config/containers"), { recursive: true });
    await Deno.writeTextFile(join(dir, ".config/containers/registries.conf"), "");
    assert.deepEqual((await loadRegistriesConf()).files, [
      join(dir, ".config/containers/registries.conf"),
    ]);

    // A broken drop-in names itself.
    await Deno.writeTextFile(join(dropins, "30-bad.conf"), "[[registry]]\nblocked = 3\n");
    Deno.env.set("SARDE_REGISTRIES_CONF_DIR", dropins);
    assert.match(
      (await thrown(() => loadRegistriesConf({ file: main }))).message,
      /30-bad\.conf: /,
    );
  } finally {
    for (const [k, v] of saved) v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
    await Deno.remove(dir, { recursive: true });
  }
});
