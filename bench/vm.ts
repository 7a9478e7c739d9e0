/**
 * The VM benchmark (`deno task bench -- --only vm`): a libvirt VM with a 2 GiB qcow2 of mixed data
 * through a throw-away local registry, sarde against the pipeline sardinecake 0.4 runs.
 *
 * In one run, on the same disk: `sarde export` + `sarde push` and `sarde pull` (fetch + import)
 * with zstd (128, 64 and 32 MiB chunks) and with gzip (0.4's layout); the 0.4 baseline (`gzip -6`
 * on one core + sha256 of the file and of the layer + `skopeo copy` up, `skopeo copy` down +
 * `gunzip`); the disk-write bound (`cp --sparse=never`, `dd conv=fsync`); a re-pull of the cached
 * image; `sarde clone` of the imported VM and of a small one; and export + push after changing 1 %
 * of the disk. Bytes moved come from the registry log, peak RSS from `/usr/bin/time`. Every VM
 * and file it makes is removed at the end, also after an error or a signal. See bench/README.md.
 *
 * @module
 */

import { join } from "node:path";
import { DEFAULT_ZSTD_CHUNK } from "../lib/util/defaults.ts";
import { SARDE } from "../tests/support/images.ts";
import { startRegistry, type TestRegistry } from "../tests/support/registry.ts";
import {
  cleanupTestVm,
  createPlainQcow2,
  domainXml,
  ensureLibvirtd,
  makeVmDir,
  removeVmDir,
  shTry,
  TEST_URI,
  uniqueVmName,
  virshDefine,
} from "../tests/support/vms.ts";
import {
  addCleanup,
  cpuOf,
  firstLine,
  formatTable,
  killCurrent,
  loadavg,
  log,
  logSince,
  logSize,
  measure,
  type Measured,
  median,
  MiB,
  registryPid,
  registryRequests,
  RSS_GOAL_MB,
  runQuiet,
  settle,
} from "./common.ts";

const TAG1 = "v1";
const TAG2 = "v2";
/** sarde's default zstd chunk size. */
const DEFAULT_CHUNK_MIB = DEFAULT_ZSTD_CHUNK / MiB;
/** Chunk sizes tried with zstd: the default first, then 128, 64, 32 MiB. */
const CHUNK_SIZES_MIB = [
  DEFAULT_CHUNK_MIB,
  ...[128, 64, 32].filter((c) => c !== DEFAULT_CHUNK_MIB),
];
const CLONE_ROUNDS = 3;
const SARDE_ENV = { LIBVIRT_DEFAULT_URI: TEST_URI };

/** Options of {@link runVmBench}. */
export interface VmBenchOptions {
  /** 512 MiB disk instead of 2 GiB. */
  quick: boolean;
  /** Measure with /usr/bin/time (else poll /proc). */
  useTime: boolean;
}

/** One line of the table. */
export interface VmRow {
  step: string;
  tool: string;
  seconds: number;
  /** 10^6 bytes of the disk's virtual size per second (undefined where meaningless). */
  mbPerSecond?: number;
  /** The baseline's seconds for the same step divided by these (> 1: faster than 0.4). */
  vsBaseline?: number;
  /** Blob bytes the registry received (completed uploads). */
  uploadedBytes?: number;
  /** Blob bytes the registry served. */
  downloadedBytes?: number;
  /** All blobs of the image (config, XML, disk layers; each distinct blob once). */
  compressedBytes?: number;
  /** Highest peak RSS of the processes of the step, 10^6 bytes (NaN: none measured). */
  peakRssMB: number;
  /** User + system CPU seconds of the client processes. */
  cpuSeconds: number;
  /** CPU seconds of the registry meanwhile. */
  registryCpuSeconds?: number;
  /** Whether sarde ran in this step (for the RSS goal). */
  sarde: boolean;
  /** The commands, and sarde's summary line where it prints one. */
  detail: string;
  /** 1-minute load average when the (first) process started. */
  load?: string;
}

/** A PASS/MISS line. */
export interface VmGoal {
  name: string;
  pass: boolean;
  detail: string;
}

/** What the 1 % change did, per chunk size. */
export interface ChangeResult {
  chunkMiB: number;
  /** Chunks of the disk file whose uncompressed digest changed. */
  changedChunks: number[];
  /** Distinct new layer blobs those chunks need (not in the registry yet). */
  expectedLayerBlobs: number;
  /** Layer blobs (not config) the registry received. */
  uploadedLayerBlobs: number;
  /** Uploaded layer blobs that are not one of the changed chunks' blobs. */
  unexpectedUploads: number;
  uploadedBytes: number;
}

/** Everything {@link runVmBench} measured. */
export interface VmReport {
  date: string;
  quick: boolean;
  virtualSize: number;
  /** Bytes of the qcow2 file. */
  fileSize: number;
  layout: string;
  change: { offset: number; length: number; results: ChangeResult[] };
  tools: Record<string, string>;
  loadavgBefore: string;
  loadavgAfter: string;
  rows: VmRow[];
  goals: VmGoal[];
}

// ---------------------------------------------------------------------------------------------
// context

interface Ctx {
  opts: VmBenchOptions;
  dir: string;
  reg: TestRegistry;
  regPid?: number;
  virtualSize: number;
  /** Source disk of the benchmark VM. */
  disk: string;
  vm: string;
  /** Every VM name this run may have defined (undefined at the end, missing ones ignored). */
  domains: Set<string>;
  rows: VmRow[];
  rssFile: string;
}

/** A measured command plus what the registry saw meanwhile. */
interface Step extends Measured {
  load: string;
  uploads: { digest: string; size: number }[];
  uploadedBytes: number;
  downloadedBytes: number;
  registryCpuSeconds: number;
}

/** Runs one command after letting the disk settle; reads the registry log of its window. */
async function step(
  ctx: Ctx,
  cmd: string,
  args: string[],
  env?: Record<string, string>,
): Promise<Step> {
  await settle(ctx.dir);
  const offset = await logSize(ctx.reg);
  const cpu0 = cpuOf(ctx.regPid);
  const load = loadavg();
  const m = await measure(cmd, args, { env, rssFile: ctx.rssFile, useTime: ctx.opts.useTime });
  const registryCpuSeconds = cpuOf(ctx.regPid) - cpu0;
  const uploads: { digest: string; size: number }[] = [];
  let downloadedBytes = 0;
  for (const r of registryRequests(await logSince(ctx.reg, offset))) {
    if (r.method === "PUT" && r.status === 201 && r.uri.includes("/blobs/uploads/")) {
      const digest = new URLSearchParams(r.uri.split("?")[1] ?? "").get("digest");
      if (digest) uploads.push({ digest, size: await registryBlobSize(ctx.reg, digest) });
    }
    if (
      r.method === "GET" && /\/blobs\/sha256:/.test(r.uri) && (r.status === 200 || r.status === 206)
    ) {
      downloadedBytes += r.written;
    }
  }
  const uploadedBytes = uploads.reduce((n, u) => n + u.size, 0);
  return { ...m, load, uploads, uploadedBytes, downloadedBytes, registryCpuSeconds };
}

/** Size of a blob in the registry's storage. */
async function registryBlobSize(reg: TestRegistry, digest: string): Promise<number> {
  const hex = digest.replace(/^sha256:/, "");
  const p = join(reg.dataDir, "docker/registry/v2/blobs/sha256", hex.slice(0, 2), hex, "data");
  return (await Deno.stat(p)).size;
}

function sardeStep(ctx: Ctx, args: string[]): Promise<Step> {
  return step(ctx, SARDE, args, SARDE_ENV);
}

/** The last line sarde wrote to stderr (its summary), without progress noise. */
function lastLine(s: string): string {
  return s.trim().split(/[\r\n]+/).filter((l) => l.trim()).at(-1)?.trim() ?? "";
}

function mbps(ctx: Ctx, seconds: number): number {
  return ctx.virtualSize / 1e6 / seconds;
}

/** Appends rows to the table (and logs them). */
function add(ctx: Ctx, ...rows: VmRow[]): void {
  for (const row of rows) {
    ctx.rows.push(row);
    const parts = [
      `${row.step} [${row.tool}] ${row.seconds.toFixed(2)} s`,
      Number.isFinite(row.peakRssMB) ? `peak RSS ${row.peakRssMB.toFixed(0)} MB` : "",
      row.uploadedBytes !== undefined ? `up ${(row.uploadedBytes / 1e6).toFixed(1)} MB` : "",
      row.downloadedBytes !== undefined ? `down ${(row.downloadedBytes / 1e6).toFixed(1)} MB` : "",
    ].filter(Boolean);
    log(`  ${parts.join(", ")} (load ${row.load}) — ${row.detail}`);
  }
}

/** A row for one measured step (not added yet). */
function rowOf(
  ctx: Ctx,
  s: Step,
  step: string,
  tool: string,
  extra: Partial<VmRow> & { sarde: boolean; detail: string },
): VmRow {
  return {
    step,
    tool,
    seconds: s.seconds,
    mbPerSecond: mbps(ctx, s.seconds),
    peakRssMB: s.rssMB,
    cpuSeconds: s.cpuSeconds,
    registryCpuSeconds: s.registryCpuSeconds,
    load: s.load,
    ...extra,
  };
}

/** A row summing several steps, e.g. export + push (not added yet). */
function sumRow(
  ctx: Ctx,
  parts: VmRow[],
  step: string,
  tool: string,
  extra: Partial<VmRow> = {},
): VmRow {
  const seconds = extra.seconds ?? parts.reduce((n, r) => n + r.seconds, 0);
  return {
    step,
    tool,
    seconds,
    mbPerSecond: mbps(ctx, seconds),
    peakRssMB: Math.max(...parts.map((r) => r.peakRssMB)),
    cpuSeconds: parts.reduce((n, r) => n + r.cpuSeconds, 0),
    registryCpuSeconds: parts.reduce((n, r) => n + (r.registryCpuSeconds ?? 0), 0),
    sarde: parts.some((r) => r.sarde),
    detail: parts.map((r) => r.step).join(" + "),
    load: parts[0].load,
    ...extra,
  };
}

// ---------------------------------------------------------------------------------------------
// the disk and the VM

/** Sizes (MiB) of the regions of the disk: random, explicit zeros, /usr tar, unallocated. */
function regions(virtualMiB: number) {
  const f = virtualMiB / 2048;
  return { random: 512 * f, zeros: 512 * f, text: 896 * f, hole: 128 * f };
}

/**
 * Makes `path`: a qcow2 of `virtualMiB` whose guest data is, in order, CSPRNG bytes, explicit
 * zeros (allocated: `convert -S 0`), the start of a tar of /usr/{lib,share,bin} (binaries, text,
 * compressible like an OS disk), and an unallocated tail (a `qemu-img resize`).
 */
async function makeDisk(path: string, virtualMiB: number): Promise<void> {
  const r = regions(virtualMiB);
  const raw = `${path}.raw`;
  const script = `
set -eu
raw=$1 out=$2
head -c ${r.random}M /dev/urandom > "$raw"
head -c ${r.zeros}M /dev/zero >> "$raw"
{ tar -cf - /usr/lib /usr/share /usr/bin 2>/dev/null || true; } | head -c ${r.text}M >> "$raw"
truncate -s ${r.random + r.zeros + r.text}M "$raw"
qemu-img convert -f raw -O qcow2 -S 0 "$raw" "$out"
rm -f "$raw"
qemu-img resize -q -f qcow2 "$out" ${virtualMiB}M
chmod 0644 "$out"
`;
  try {
    await runQuiet("bash", ["-c", script, "make-disk", raw, path]);
  } finally {
    await Deno.remove(raw).catch(() => {});
  }
}

/** Defines a `type='qemu'` VM (no network) with one qcow2 disk. */
async function defineVm(ctx: Ctx, name: string, disk: string): Promise<void> {
  ctx.domains.add(name);
  await virshDefine(
    domainXml({ name, disks: [{ path: disk, format: "qcow2" }] }),
    TEST_URI,
    ctx.dir,
  );
}

/** `qemu-img compare`: the guest-visible content of two images is the same. */
async function assertSameDisk(a: string, b: string): Promise<void> {
  const r = await shTry("qemu-img", ["compare", "-q", a, b]);
  if (r.code !== 0) throw new Error(`qemu-img compare ${a} ${b}: ${r.code} ${r.stdout}${r.stderr}`);
}

/** The one qcow2 file of an imported VM's folder. */
async function importedDisk(folder: string): Promise<string> {
  for await (const e of Deno.readDir(folder)) {
    if (e.isFile && e.name.endsWith(".qcow2")) return join(folder, e.name);
  }
  throw new Error(`no qcow2 in ${folder}`);
}

async function undefine(ctx: Ctx, name: string): Promise<void> {
  await cleanupTestVm(name, { connect: TEST_URI }).catch((err) => log(`cleanup: ${err.message}`));
  ctx.domains.delete(name);
}

/** Domains whose XML names a file under `dir` (catches any VM the tracking missed). */
async function domainsUsing(dir: string): Promise<string[]> {
  const list = await shTry("virsh", ["-c", TEST_URI, "list", "--all", "--name"]);
  const out: string[] = [];
  for (const name of list.stdout.split("\n").map((l) => l.trim()).filter(Boolean)) {
    const xml = await shTry("virsh", ["-c", TEST_URI, "dumpxml", "--inactive", "--domain", name]);
    if (xml.code === 0 && xml.stdout.includes(`${dir}/`)) out.push(name);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// images

interface ImageInfo {
  /** Config + distinct layer blobs. */
  bytes: number;
  layers: { digest: string; size: number; annotations?: Record<string, string> }[];
}

/** The blobs of `tag` in the OCI layout `dir`. */
async function imageInfo(dir: string, tag: string): Promise<ImageInfo> {
  const index = JSON.parse(await Deno.readTextFile(join(dir, "index.json")));
  const desc = index.manifests.findLast((m: { annotations?: Record<string, string> }) =>
    m.annotations?.["org.opencontainers.image.ref.name"] === tag
  );
  if (!desc) throw new Error(`no ${tag} in ${dir}`);
  const manifest = JSON.parse(
    await Deno.readTextFile(join(dir, "blobs", "sha256", desc.digest.slice(7))),
  );
  const seen = new Set<string>();
  let bytes = manifest.config.size;
  for (const l of manifest.layers) {
    if (!seen.has(l.digest)) bytes += l.size;
    seen.add(l.digest);
  }
  return { bytes, layers: manifest.layers };
}

/** The layout folder of `repo` in a sarde store (`STORE/HOST/REPO`). */
function sardeLayout(ctx: Ctx, store: string, repo: string): string {
  return join(store, ctx.reg.host, repo);
}

async function sha256Hex(data: Uint8Array<ArrayBuffer>): Promise<string> {
  const h = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
  return Array.from(h).map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Writes `data` as a blob of the layout `dir`; returns its descriptor. */
async function putBlob(dir: string, data: Uint8Array<ArrayBuffer>, mediaType: string) {
  const hex = await sha256Hex(data);
  await Deno.writeFile(join(dir, "blobs", "sha256", hex), data);
  return { mediaType, digest: `sha256:${hex}`, size: data.length };
}

// ---------------------------------------------------------------------------------------------
// the steps

/** The disk-write bound: the same bytes written to the same file system. */
async function writeBound(ctx: Ctx): Promise<{ cp: VmRow; dd: VmRow }> {
  log("disk-write bound");
  const dst = join(ctx.dir, "bound.qcow2");
  const cp = await step(ctx, "cp", ["--sparse=never", ctx.disk, dst]);
  await Deno.remove(dst);
  const cpRow = rowOf(ctx, cp, "disk write (page cache)", "cp --sparse=never", {
    sarde: false,
    detail: `cp --sparse=never DISK COPY: the qcow2 file's bytes, no fsync (like sarde's import)`,
  });
  const dd = await step(ctx, "dd", [
    `if=${ctx.disk}`,
    `of=${dst}`,
    "bs=4M",
    "conv=fsync",
    "status=none",
  ]);
  await Deno.remove(dst);
  const ddRow = rowOf(ctx, dd, "disk write (to the device)", "dd bs=4M conv=fsync", {
    sarde: false,
    detail: "dd if=DISK of=COPY bs=4M conv=fsync: until the data is on the device",
  });
  add(ctx, cpRow, ddRow);
  return { cp: cpRow, dd: ddRow };
}

/** sardinecake 0.4's pipeline: gzip -6 + sha256 + OCI layout + skopeo copy, and back. */
async function baseline(ctx: Ctx): Promise<{ up: VmRow; down: VmRow; bytes: number }> {
  log("baseline: sardinecake 0.4 (gzip -6 single core, skopeo copy, gunzip)");
  const root = join(ctx.dir, "baseline");
  const layout = join(root, "layout");
  await Deno.mkdir(join(layout, "blobs", "sha256"), { recursive: true });
  const layer = join(root, "disk.qcow2.gz");
  const gz = await step(ctx, "bash", ["-c", 'gzip -6 -c "$1" > "$2"', "gzip", ctx.disk, layer]);
  const gzRow = rowOf(ctx, gz, "export: gzip -6", "0.4 baseline", {
    sarde: false,
    detail: "gzip -6 -c DISK > LAYER (one core, as Python's gzip module)",
  });
  // openssl uses SHA-NI like Python's hashlib (0.4); coreutils' sha256sum is 6× slower here
  const diffId = await step(ctx, "openssl", ["dgst", "-sha256", "-r", ctx.disk]);
  const layerSum = await step(ctx, "openssl", ["dgst", "-sha256", "-r", layer]);
  const hashRow = sumRow(
    ctx,
    [
      rowOf(ctx, diffId, "export: sha256 of the disk", "0.4 baseline", {
        sarde: false,
        detail: "openssl dgst -sha256 DISK (the config's diff_id)",
      }),
      rowOf(ctx, layerSum, "export: sha256 of the layer", "0.4 baseline", {
        sarde: false,
        detail: "openssl dgst -sha256 LAYER (the layer digest)",
      }),
    ],
    "export: sha256 (disk + layer)",
    "0.4 baseline",
    {
      detail: "openssl dgst -sha256 of DISK (the config's diff_id) and of LAYER (its digest)",
    },
  );
  const t0 = performance.now();
  const layerHex = layerSum.stdout.split(" ")[0];
  const diffHex = diffId.stdout.split(" ")[0];
  await Deno.rename(layer, join(layout, "blobs", "sha256", layerHex));
  const enc = new TextEncoder();
  const xmlText = await runQuiet("virsh", ["-c", TEST_URI, "dumpxml", "--domain", ctx.vm]);
  const xml = await putBlob(
    layout,
    enc.encode(xmlText),
    "application/vnd.libvirt.domain.config+xml",
  );
  const disk = {
    mediaType: "application/x-qemu-disk+gzip",
    digest: `sha256:${layerHex}`,
    size: (await Deno.stat(join(layout, "blobs", "sha256", layerHex))).size,
  };
  const now = new Date().toISOString();
  const config = await putBlob(
    layout,
    enc.encode(JSON.stringify(
      {
        architecture: "amd64",
        os: "linux",
        rootfs: { type: "layers", diff_ids: [xml.digest, `sha256:${diffHex}`] },
        history: [{ created: now, created_by: `virsh dumpxml '${ctx.vm}'` }, {
          created: Date.now() / 1000,
          created_by: "gzip -6 -c disk.qcow2 | split -b None disk.qcow2.gz # approximately",
        }],
      },
      null,
      2,
    )),
    "application/vnd.oci.image.config.v1+json",
  );
  const manifest = await putBlob(
    layout,
    enc.encode(JSON.stringify(
      {
        config,
        layers: [xml, disk],
        mediaType: "application/vnd.oci.image.manifest.v1+json",
        schemaVersion: 2,
      },
      null,
      2,
    )),
    "application/vnd.oci.image.manifest.v1+json",
  );
  await Deno.writeTextFile(
    join(layout, "index.json"),
    JSON.stringify({
      schemaVersion: 2,
      manifests: [{ ...manifest, annotations: { "org.opencontainers.image.ref.name": TAG1 } }],
    }),
  );
  await Deno.writeTextFile(join(layout, "oci-layout"), '{"imageLayoutVersion": "1.0.0"}');
  const layoutSeconds = (performance.now() - t0) / 1000;
  const bytes = config.size + xml.size + disk.size;

  const remote = `docker://${ctx.reg.host}/bench/vm-baseline:${TAG1}`;
  const push = await step(
    ctx,
    "skopeo",
    ["copy", "--dest-tls-verify=false", `oci:${layout}:${TAG1}`, remote],
    skopeoEnv(root, "push"),
  );
  const exportRow = sumRow(ctx, [gzRow, hashRow], "export", "0.4 baseline", {
    seconds: gzRow.seconds + hashRow.seconds + layoutSeconds,
    compressedBytes: bytes,
    detail: `gzip -6 + sha256 ×2 + writing the layout (${layoutSeconds.toFixed(2)} s)`,
  });
  const pushRow = rowOf(ctx, push, "push", "0.4 baseline", {
    sarde: false,
    uploadedBytes: push.uploadedBytes,
    detail: "skopeo copy oci:LAYOUT:v1 docker://HOST/bench/vm-baseline:v1",
  });
  const up = sumRow(ctx, [exportRow, pushRow], "export+push", "0.4 baseline", {
    uploadedBytes: push.uploadedBytes,
    compressedBytes: bytes,
  });
  add(ctx, gzRow, hashRow, exportRow, pushRow, up);
  await Deno.remove(join(layout, "blobs", "sha256", layerHex));

  const pulled = join(root, "pulled");
  const fetch = await step(
    ctx,
    "skopeo",
    ["copy", "--src-tls-verify=false", remote, `oci:${pulled}:${TAG1}`],
    skopeoEnv(root, "fetch"),
  );
  const fetchRow = rowOf(ctx, fetch, "fetch", "0.4 baseline", {
    sarde: false,
    downloadedBytes: fetch.downloadedBytes,
    detail: "skopeo copy docker://HOST/bench/vm-baseline:v1 oci:DIR:v1",
  });
  const got = await imageInfo(pulled, TAG1);
  const gzLayer = join(pulled, "blobs", "sha256", got.layers[1].digest.slice(7));
  const out = join(root, "disk.qcow2");
  const gunzip = await step(ctx, "bash", ["-c", 'gunzip -c "$1" > "$2"', "gunzip", gzLayer, out]);
  const gunzipRow = rowOf(ctx, gunzip, "import: gunzip", "0.4 baseline", {
    sarde: false,
    detail: "gunzip -c LAYER > DISK",
  });
  await assertSameDisk(ctx.disk, out);
  const down = sumRow(ctx, [fetchRow, gunzipRow], "pull (fetch+import)", "0.4 baseline", {
    downloadedBytes: fetch.downloadedBytes,
  });
  add(ctx, fetchRow, gunzipRow, down);
  await Deno.remove(root, { recursive: true });
  return { up, down, bytes };
}

/** A private, empty blob-info cache so skopeo cannot mount a blob it saw elsewhere. */
function skopeoEnv(root: string, what: string): Record<string, string> {
  return { _CONTAINERS_ROOTLESS_UID: "65534", XDG_DATA_HOME: join(root, `skopeo-cache-${what}`) };
}

/** One sarde variant: export + push into a fresh repository, pull into a fresh store and vmdir. */
interface Variant {
  label: string;
  compression: "zstd" | "gzip";
  chunkMiB?: number;
  repo: string;
  /** The exporter's store (kept for the 1 % change). */
  store: string;
  up?: VmRow;
  down?: VmRow;
  exportRow?: VmRow;
  pushRow?: VmRow;
  /** `sarde export --push` (one command, uploads while compressing) into a fresh repository. */
  onePass?: VmRow;
  bytes?: number;
  /** Pulled store, vmdir and VM name (kept for re-pull and clone of the default). */
  pulledStore?: string;
  vmdir?: string;
  name?: string;
}

async function sardeRoundTrip(ctx: Ctx, v: Variant): Promise<void> {
  log(`sarde ${v.label}`);
  const ref = `${ctx.reg.host}/${v.repo}:${TAG1}`;
  const args = ["export", "-d", v.store, "--compression", v.compression];
  // explicit even for the default, so the default changing under a run cannot mix sizes
  if (v.chunkMiB) args.push("--chunksize", `${v.chunkMiB}MiB`);
  const exp = await sardeStep(ctx, [...args, ctx.vm, ref]);
  const info = await imageInfo(sardeLayout(ctx, v.store, v.repo), TAG1);
  v.bytes = info.bytes;
  v.exportRow = rowOf(ctx, exp, "export", `sarde ${v.label}`, {
    sarde: true,
    compressedBytes: info.bytes,
    detail: `sarde ${args.slice(0, 1).concat(args.slice(3)).join(" ")} VM REF`,
  });
  const push = await sardeStep(ctx, ["push", "-d", v.store, ref]);
  v.pushRow = rowOf(ctx, push, "push", `sarde ${v.label}`, {
    sarde: true,
    uploadedBytes: push.uploadedBytes,
    detail: `sarde push: ${lastLine(push.stderr)}`,
  });
  v.up = sumRow(ctx, [v.exportRow, v.pushRow], "export+push", `sarde ${v.label}`, {
    uploadedBytes: push.uploadedBytes,
    compressedBytes: info.bytes,
  });
  add(ctx, v.exportRow, v.pushRow, v.up);

  const base = join(ctx.dir, v.repo.replaceAll("/", "-"));
  v.pulledStore = join(base, "pulled");
  v.vmdir = join(base, "vms");
  ctx.domains.add(`sha256:${exp.stdout.trim()}`); // the name pull will give the VM
  const pull = await sardeStep(ctx, ["pull", "-d", v.pulledStore, "--vmdir", v.vmdir, ref]);
  v.name = pull.stdout.trim();
  ctx.domains.add(v.name);
  v.down = rowOf(ctx, pull, "pull (fetch+import)", `sarde ${v.label}`, {
    sarde: true,
    downloadedBytes: pull.downloadedBytes,
    detail: `sarde pull -d NEW --vmdir NEW REF → ${v.name.slice(0, 19)}…`,
  });
  add(ctx, v.down);
  await assertSameDisk(ctx.disk, await importedDisk(join(v.vmdir, v.name)));
}

/** `sarde export --push` of the variant into a fresh store and repository: one command. */
async function onePass(ctx: Ctx, v: Variant): Promise<void> {
  log(`sarde ${v.label}: export --push`);
  const store = `${v.store}-onepass`;
  const repo = `${v.repo}-onepass`;
  const ref = `${ctx.reg.host}/${repo}:${TAG1}`;
  const args = ["export", "--push", "-d", store, "--compression", v.compression];
  if (v.chunkMiB) args.push("--chunksize", `${v.chunkMiB}MiB`);
  const s = await sardeStep(ctx, [...args, ctx.vm, ref]);
  const info = await imageInfo(sardeLayout(ctx, store, repo), TAG1);
  if (info.bytes !== v.bytes) {
    throw new Error(`export --push stored ${info.bytes} bytes, export ${v.bytes}`);
  }
  if ((s.uploadedBytes ?? 0) < info.bytes) {
    throw new Error(`export --push uploaded ${s.uploadedBytes} of ${info.bytes} bytes`);
  }
  v.onePass = rowOf(ctx, s, "export+push: export --push", `sarde ${v.label}`, {
    sarde: true,
    uploadedBytes: s.uploadedBytes,
    compressedBytes: info.bytes,
    detail: `sarde ${args.slice(0, 2).concat(args.slice(4)).join(" ")} VM REF: ${
      lastLine(s.stderr)
    }`,
  });
  add(ctx, v.onePass);
  await Deno.remove(store, { recursive: true });
}

/** Drops the pulled VM, store and vmdir of a variant. */
async function dropPulled(ctx: Ctx, v: Variant): Promise<void> {
  if (v.name) await undefine(ctx, v.name);
  for (const d of [v.pulledStore, v.vmdir]) if (d) await Deno.remove(d, { recursive: true });
}

async function rePull(ctx: Ctx, v: Variant): Promise<VmRow> {
  log("re-pull of the cached image");
  const ref = `${ctx.reg.host}/${v.repo}:${TAG1}`;
  const again = await sardeStep(ctx, ["pull", "-d", v.pulledStore!, "--vmdir", v.vmdir!, ref]);
  if (again.stdout.trim() !== v.name) {
    throw new Error(`re-pull gave VM ${again.stdout.trim()}, expected ${v.name}`);
  }
  const row = rowOf(ctx, again, "re-pull (cached)", `sarde ${v.label}`, {
    mbPerSecond: undefined,
    sarde: true,
    downloadedBytes: again.downloadedBytes,
    detail: `same command again: ${lastLine(again.stderr)}`,
  });
  add(ctx, row);
  return row;
}

/** `sarde clone` of an imported VM, {@link CLONE_ROUNDS} times; the row has the median. */
async function cloneRounds(
  ctx: Ctx,
  label: string,
  store: string,
  vmdir: string,
  base: string,
): Promise<VmRow> {
  const samples: Step[] = [];
  for (let i = 0; i < CLONE_ROUNDS; i++) {
    const target = uniqueVmName("sarde-bench-clone");
    ctx.domains.add(target);
    samples.push(await sardeStep(ctx, ["clone", "-d", store, "--vmdir", vmdir, base, target]));
    await undefine(ctx, target);
    await Deno.remove(join(vmdir, target), { recursive: true }).catch(() => {});
  }
  const secs = samples.map((s) => s.seconds);
  const mid = samples.find((s) => s.seconds === median(secs)) ?? samples[0];
  const row = rowOf(ctx, mid, `clone (${label})`, "sarde", {
    mbPerSecond: undefined,
    peakRssMB: Math.max(...samples.map((s) => s.rssMB)),
    sarde: true,
    detail: `sarde clone IMPORTED NEW: median of ${CLONE_ROUNDS} (${
      secs.map((s) => s.toFixed(2)).join(", ")
    } s)`,
  });
  add(ctx, row);
  return row;
}

/** A small VM (64 MiB qcow2), exported and imported locally, cloned: the clone cost vs size. */
async function cloneSmall(ctx: Ctx): Promise<VmRow> {
  log("clone of a small VM");
  const root = join(ctx.dir, "small");
  await Deno.mkdir(root, { mode: 0o755 });
  await Deno.chmod(root, 0o755);
  const disk = await createPlainQcow2(root, { name: "small.qcow2", size: 64 * MiB });
  const name = uniqueVmName("sarde-bench-small");
  await defineVm(ctx, name, disk.path);
  const store = join(root, "store");
  const vmdir = join(root, "vms");
  const id = (await runQuiet(SARDE, ["export", "-d", store, name, "local/small:v1"], SARDE_ENV))
    .trim().split("\n")[0];
  ctx.domains.add(`sha256:${id}`);
  const imported = (await runQuiet(
    SARDE,
    ["import", "-d", store, "--vmdir", vmdir, "local/small:v1"],
    SARDE_ENV,
  )).trim().split("\n")[0];
  ctx.domains.add(imported);
  const row = await cloneRounds(ctx, "64 MiB disk", store, vmdir, imported);
  await undefine(ctx, imported);
  await undefine(ctx, name);
  await Deno.remove(root, { recursive: true });
  return row;
}

/** Writes 1 % of the disk, then exports v2 and pushes it for every zstd chunk size. */
async function change(ctx: Ctx, variants: Variant[]): Promise<VmReport["change"]> {
  const offset = Math.floor((ctx.virtualSize * 0.5176) / MiB) * MiB;
  const length = Math.round((ctx.virtualSize * 0.01) / MiB) * MiB;
  log(`1 % change: ${length / MiB} MiB at ${offset / MiB} MiB`);
  await runQuiet("qemu-io", ["-f", "qcow2", "-c", `write -P 0x5a ${offset} ${length}`, ctx.disk]);
  const results: ChangeResult[] = [];
  for (const v of variants) {
    const ref = `${ctx.reg.host}/${v.repo}:${TAG2}`;
    const args = ["export", "-d", v.store];
    args.push("--chunksize", `${v.chunkMiB}MiB`);
    const exp = await sardeStep(ctx, [...args, ctx.vm, ref]);
    const layout = sardeLayout(ctx, v.store, v.repo);
    const before = await imageInfo(layout, TAG1);
    const after = await imageInfo(layout, TAG2);
    const expRow = rowOf(ctx, exp, "1 % changed: export", `sarde ${v.label}`, {
      sarde: true,
      compressedBytes: after.bytes,
      detail: `sarde export … REF:v2 into the exporter's store`,
    });
    const push = await sardeStep(ctx, ["push", "-d", v.store, ref]);
    // Chunks whose uncompressed content changed, and the blobs they need that v1 did not have.
    const chunkKey = (l: ImageInfo["layers"][number]) =>
      `${l.annotations?.["org.sardinecake.file.name"]}#${
        l.annotations?.["org.sardinecake.chunk.index"]
      }`;
    const old = new Map(before.layers.map((l) => [chunkKey(l), l]));
    const oldBlobs = new Set(before.layers.map((l) => l.digest));
    const changed: number[] = [];
    const needed = new Set<string>();
    for (const l of after.layers) {
      if (!l.annotations?.["org.sardinecake.chunk.index"]) continue;
      const o = old.get(chunkKey(l));
      const cd = "org.sardinecake.chunk.digest";
      if (!o || o.annotations?.[cd] !== l.annotations[cd]) {
        changed.push(Number(l.annotations["org.sardinecake.chunk.index"]));
        if (!oldBlobs.has(l.digest)) needed.add(l.digest);
      }
    }
    const layerDigests = new Set(after.layers.map((l) => l.digest));
    const layerUploads = push.uploads.filter((u) => layerDigests.has(u.digest));
    const unexpected = layerUploads.filter((u) => !needed.has(u.digest)).length;
    results.push({
      chunkMiB: v.chunkMiB!,
      changedChunks: changed,
      expectedLayerBlobs: needed.size,
      uploadedLayerBlobs: layerUploads.length,
      unexpectedUploads: unexpected,
      uploadedBytes: push.uploadedBytes,
    });
    const pushRow = rowOf(ctx, push, "1 % changed: push", `sarde ${v.label}`, {
      sarde: true,
      uploadedBytes: push.uploadedBytes,
      detail: `${changed.length} chunk(s) changed (#${
        changed.join(", #")
      }); uploaded ${push.uploads.length} blobs (${layerUploads.length} disk chunks + config); sarde: ${
        lastLine(push.stderr)
      }`,
    });
    add(
      ctx,
      expRow,
      pushRow,
      sumRow(ctx, [expRow, pushRow], "1 % changed: export+push", `sarde ${v.label}`, {
        uploadedBytes: push.uploadedBytes,
        compressedBytes: after.bytes,
      }),
    );
  }
  return { offset, length, results };
}

// ---------------------------------------------------------------------------------------------
// goals and output

function goals(
  ctx: Ctx,
  r: {
    base: { up: VmRow; down: VmRow; bytes: number };
    bound: { cp: VmRow; dd: VmRow };
    variants: Variant[];
    gzip: Variant;
    rePull: VmRow;
    clones: VmRow[];
    change: VmReport["change"];
  },
): VmGoal[] {
  const def = r.variants[0];
  const x = (a: number, b: number) => `${(a / b).toFixed(2)}×`;
  const all = [...r.variants, r.gzip];
  // The faster of export-then-push and the one command `export --push`.
  const defUp = def.onePass && def.onePass.seconds < def.up!.seconds ? def.onePass : def.up!;
  const upRatio = r.base.up.seconds / defUp.seconds;
  const downRatio = r.base.down.seconds / def.down!.seconds;
  const boundShare = r.bound.dd.seconds / def.down!.seconds;
  const sardeRows = ctx.rows.filter((row) => row.sarde && Number.isFinite(row.peakRssMB));
  const maxRss = sardeRows.reduce((a, b) => (b.peakRssMB > a.peakRssMB ? b : a));
  const cloneMax = Math.max(...r.clones.map((c) => c.seconds));
  const defChange = r.change.results[0];
  const changeOk = (c: ChangeResult) =>
    c.unexpectedUploads === 0 && c.uploadedLayerBlobs === c.expectedLayerBlobs &&
    c.changedChunks.length <= Math.ceil(r.change.length / (c.chunkMiB * MiB)) + 1;
  const mb = (n: number) => `${(n / 1e6).toFixed(1)} MB`;
  return [
    {
      name: "export+push ≥ 8× faster than 0.4",
      pass: upRatio >= 8,
      detail:
        `${def.label} ${x(r.base.up.seconds, defUp.seconds)} (${defUp.step}: ${
          defUp.seconds.toFixed(1)
        } s vs ${r.base.up.seconds.toFixed(1)} s; export, then push: ${
          x(r.base.up.seconds, def.up!.seconds)
        }); ` +
        all.slice(1).map((v) => `${v.label} ${x(r.base.up.seconds, v.up!.seconds)}`).join(", "),
    },
    {
      name: "fetch+import ≥ 3× faster than 0.4",
      pass: downRatio >= 3,
      detail:
        `${def.label} ${x(r.base.down.seconds, def.down!.seconds)} (${
          def.down!.seconds.toFixed(1)
        } s vs ${r.base.down.seconds.toFixed(1)} s); ` +
        all.slice(1).map((v) => `${v.label} ${x(r.base.down.seconds, v.down!.seconds)}`).join(
          ", ",
        ),
    },
    {
      name: "fetch+import within 70 % of the disk-write bound",
      pass: boundShare >= 0.7,
      detail: `pull ${def.down!.seconds.toFixed(1)} s vs dd conv=fsync ${
        r.bound.dd.seconds.toFixed(1)
      } s = ${(boundShare * 100).toFixed(0)} % of the bound's speed (cp to the page cache ${
        r.bound.cp.seconds.toFixed(1)
      } s = ${(100 * r.bound.cp.seconds / def.down!.seconds).toFixed(0)} %)`,
    },
    {
      name: "compressed size ≤ gzip -6",
      pass: def.bytes! <= r.base.bytes,
      detail:
        `${def.label} ${mb(def.bytes!)} vs gzip -6 ${mb(r.base.bytes)} (${
          (100 * def.bytes! / r.base.bytes).toFixed(1)
        } %); ` + all.slice(1).map((v) => `${v.label} ${mb(v.bytes!)}`).join(", "),
    },
    {
      name: "clone < 1 s regardless of size",
      pass: cloneMax < 1,
      detail: r.clones.map((c) =>
        `${c.step.replace(/^clone \((.*)\)$/, "$1")} ${c.seconds.toFixed(2)} s`
      )
        .join(", "),
    },
    {
      name: "re-pull downloads 0 blob bytes",
      pass: r.rePull.downloadedBytes === 0,
      detail: `${r.rePull.downloadedBytes} blob bytes served, ${r.rePull.seconds.toFixed(2)} s`,
    },
    {
      name: "1 % change uploads only the changed chunks",
      pass: changeOk(defChange),
      detail: r.change.results.map((c) =>
        `${c.chunkMiB} MiB${
          c.chunkMiB === DEFAULT_CHUNK_MIB ? " (default)" : ""
        }: ${c.changedChunks.length} chunk(s) changed, ${c.uploadedLayerBlobs} uploaded${
          c.unexpectedUploads ? ` (${c.unexpectedUploads} unexpected)` : ""
        }, ${mb(c.uploadedBytes)}${changeOk(c) ? "" : " MISS"}`
      ).join("; "),
    },
    {
      name: `peak RSS < ${RSS_GOAL_MB} MB`,
      pass: maxRss.peakRssMB < RSS_GOAL_MB,
      detail: `sarde peak ${maxRss.peakRssMB.toFixed(0)} MB in ${maxRss.step} [${maxRss.tool}]`,
    },
  ];
}

function vmTable(rows: VmRow[]): string {
  const head = [
    "step",
    "tool",
    "seconds",
    "MB/s",
    "vs 0.4",
    "up MB",
    "down MB",
    "size MB",
    "peak RSS MB",
    "CPU s",
    "reg CPU s",
    "load",
  ];
  const n = (x: number | undefined, d = 1) =>
    x === undefined || !Number.isFinite(x) ? "" : x.toFixed(d);
  const body = rows.map((r) => [
    r.step,
    r.tool,
    r.seconds.toFixed(2),
    n(r.mbPerSecond),
    r.vsBaseline === undefined ? "" : `${r.vsBaseline.toFixed(2)}×`,
    n(r.uploadedBytes === undefined ? undefined : r.uploadedBytes / 1e6),
    n(r.downloadedBytes === undefined ? undefined : r.downloadedBytes / 1e6),
    n(r.compressedBytes === undefined ? undefined : r.compressedBytes / 1e6),
    n(r.peakRssMB, 0),
    n(r.cpuSeconds),
    n(r.registryCpuSeconds),
    r.load ?? "",
  ]);
  return formatTable(head, body, head.map((_, i) => i >= 2));
}

/** The VM benchmark's report as text (header, table, goal lines). */
export function formatVmReport(r: VmReport, env: Record<string, string>): string {
  const vMB = (r.virtualSize / 1e6).toFixed(1);
  const lines = [
    `# VM benchmark: sarde ${env.sarde} (deno ${env.deno}) vs sardinecake 0.4's pipeline ` +
    `(${r.tools.gzip}, ${env.skopeo}); ${r.tools.zstd}; ${r.tools.qemu}; ${env.registry}; ` +
    `${env.cpus} CPUs; loopback http`,
    `# disk: qcow2, virtual ${r.virtualSize / MiB} MiB (${vMB} MB), file ${
      (r.fileSize / 1e6).toFixed(1)
    } MB: ${r.layout}; VM defined under qemu:///system (type qemu, not booted)`,
    `# load average (1 min) before ${r.loadavgBefore}, after ${r.loadavgAfter}`,
    `# one run; seconds: wall clock of the process(es), sums for "+" steps; MB = 10^6 bytes; ` +
    `MB/s = the disk's virtual size (${vMB} MB) / seconds, for every row;`,
    `# vs 0.4 = the baseline's seconds / these (> 1: faster); up/down MB: blob bytes the ` +
    `registry received/served (its log); size MB: all blobs of the image; ` +
    `peak RSS: highest of the step's processes; CPU s: user+sys of the client(s) and their ` +
    `children (zstd, pigz, qemu-img); reg CPU s: the registry's; load: 1-min load average at the start`,
    vmTable(r.rows),
    "",
    ...r.goals.map((g) => `goal ${g.name}: ${g.pass ? "PASS" : "MISS"} (${g.detail})`),
  ];
  return lines.join("\n") + "\n";
}

// ---------------------------------------------------------------------------------------------

/** Runs the VM benchmark; cleans up everything it made (VMs, files, registry) before returning. */
export async function runVmBench(opts: VmBenchOptions): Promise<VmReport> {
  const virtualMiB = opts.quick ? 512 : 2048;
  const loadavgBefore = loadavg();
  await ensureLibvirtd();
  const tools = {
    zstd: await firstLine("zstd", ["--version"]),
    gzip: await firstLine("gzip", ["--version"]),
    qemu: await firstLine("qemu-img", ["--version"]),
  };
  const dir = await makeVmDir("bench-vm");
  let reg: TestRegistry | undefined;
  const domains = new Set<string>();
  let cleaned: Promise<void> | undefined;
  const cleanup = () =>
    cleaned ??= (async () => {
      killCurrent();
      for (const name of [...domains, ...await domainsUsing(dir).catch(() => [])]) {
        await cleanupTestVm(name, { connect: TEST_URI }).catch((err) =>
          log(`cleanup of VM ${name}: ${err.message}`)
        );
      }
      await reg?.stop();
      await removeVmDir(dir);
    })();
  const unregister = addCleanup(cleanup);
  try {
    reg = await startRegistry("plain");
    const ctx: Ctx = {
      opts,
      dir,
      reg,
      regPid: await registryPid(reg),
      virtualSize: virtualMiB * MiB,
      disk: join(dir, "src", "disk.qcow2"),
      vm: uniqueVmName("sarde-bench-vm"),
      domains,
      rows: [],
      rssFile: join(dir, "rss.txt"),
    };
    log(`VM benchmark: registry ${reg.url}, work dir ${dir}`);
    log(`making a ${virtualMiB} MiB qcow2 with mixed data`);
    await Deno.mkdir(join(dir, "src"), { mode: 0o755 });
    await Deno.chmod(join(dir, "src"), 0o755);
    await makeDisk(ctx.disk, virtualMiB);
    const fileSize = (await Deno.stat(ctx.disk)).size;
    await defineVm(ctx, ctx.vm, ctx.disk);
    await runQuiet("bash", ["-c", 'cat "$1" > /dev/null', "cat", ctx.disk]); // page cache

    const bound = await writeBound(ctx);
    const base = await baseline(ctx);

    const variants: Variant[] = CHUNK_SIZES_MIB.map((c) => ({
      label: `zstd ${c} MiB${c === DEFAULT_CHUNK_MIB ? " (default)" : ""}`,
      compression: "zstd",
      chunkMiB: c,
      repo: `bench/vm-zstd-${c}m`,
      store: join(dir, `store-zstd-${c}m`),
    }));
    const gzip: Variant = {
      label: "gzip",
      compression: "gzip",
      repo: "bench/vm-gzip",
      store: join(dir, "store-gzip"),
    };
    const clones: VmRow[] = [];
    let rePullRow: VmRow | undefined;
    for (const v of [variants[0], gzip, ...variants.slice(1)]) {
      await sardeRoundTrip(ctx, v);
      if (v === variants[0]) {
        await onePass(ctx, v);
        rePullRow = await rePull(ctx, v);
        log("clone of the imported VM");
        clones.push(
          await cloneRounds(ctx, `${virtualMiB} MiB disk`, v.pulledStore!, v.vmdir!, v.name!),
        );
        clones.push(await cloneSmall(ctx));
      }
      await dropPulled(ctx, v);
      if (v === gzip) await Deno.remove(v.store, { recursive: true });
    }
    // ratios against the baseline
    for (const row of ctx.rows) {
      if (row.tool === "0.4 baseline" || row.step.startsWith("1 %")) continue;
      const step = row.step.replace(/:.*$/, ""); // "export+push: export --push" → "export+push"
      const b = ctx.rows.find((x) => x.tool === "0.4 baseline" && x.step === step);
      if (b) row.vsBaseline = b.seconds / row.seconds;
    }
    const changeResult = await change(ctx, variants);

    const g = goals(ctx, {
      base,
      bound,
      variants,
      gzip,
      rePull: rePullRow!,
      clones,
      change: changeResult,
    });
    const r = regions(virtualMiB);
    return {
      date: new Date().toISOString(),
      quick: opts.quick,
      virtualSize: ctx.virtualSize,
      fileSize,
      layout: `${r.random} MiB random, ${r.zeros} MiB explicit zeros (allocated), ${r.text} MiB ` +
        `tar of /usr/{lib,share,bin}, ${r.hole} MiB unallocated`,
      change: changeResult,
      tools,
      loadavgBefore,
      loadavgAfter: loadavg(),
      rows: ctx.rows,
      goals: g,
    };
  } finally {
    await cleanup();
    unregister();
  }
}
