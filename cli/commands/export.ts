/**
 * `sarde export`: store a libvirt VM as an image, and with `--push` upload it as it is compressed.
 *
 * @module
 */

import type { Command } from "commander";
import * as sarde from "../../mod.ts";
import { SardeError } from "../../lib/util/errors.ts";
import { info } from "../../lib/util/log.ts";
import { parseIntInRange, parseSize } from "../../lib/util/units.ts";
import { checkChunkSize } from "../../lib/vm/export.ts";
import { addTransferOptions, type CommonCli, connectOption, settings } from "../common.ts";
import { checkOption, choiceOption, pathOption, valueOption } from "../options.ts";
import { out, summary } from "../output.ts";
import { addSigningOptions, signing, type SigningCli } from "../signing.ts";

/** The parsed values of `export`. */
interface ExportCli extends CommonCli, SigningCli {
  tag?: string;
  vmconfig?: string;
  libvirtconfig?: string;
  compression?: "zstd" | "gzip";
  chunksize?: number;
  zstdLevel?: number;
  force?: boolean;
  push?: boolean;
}

/** Adds `export` to `program`. */
export function exportCommand(program: Command): Command {
  const exportCmd = program.command("export")
    .description(
      "store a libvirt VM (XML, disks with backing chains, NVRAM, kernel) as an image; prints the image ID",
    )
    .argument("<vm>", "libvirt VM name")
    .argument(
      "[image]",
      "image name, e.g. registry.example.org/sardines/debian12:latest (default: <vm>:latest)",
    )
    .option("-t, --tag <image>", "image name (same as the [image] argument)")
    .addOption(connectOption())
    .addOption(
      pathOption(
        "--vmconfig <file>",
        "JSON with users and services of the VM (checked against the schema)",
      ),
    )
    .addOption(
      pathOption("--libvirtconfig <file>", "read the domain XML from this file instead of libvirt"),
    )
    .addOption(
      choiceOption(
        "--compression <kind>",
        "disk encoding: zstd (fast, default) or gzip (readable by sardinecake 0.4)",
        ["zstd", "gzip"],
      ),
    )
    .addOption(
      valueOption(
        "--chunksize <size>",
        "zstd: uncompressed chunk size (default 64MiB, at least 1MiB); " +
          "gzip: compressed piece size (default: one piece, at least 64KiB)",
        parseSize,
      ),
    )
    .addOption(
      valueOption(
        "--zstd-level <n>",
        "zstd level 1-19 (default 2; 3 makes images ~1.5 % smaller for ~40 % more CPU)",
        (text, what) => parseIntInRange(text, what, 1, 19),
      ),
    )
    .option("-f, --force", "export even if the VM is running")
    .option(
      "--push",
      "also push the image to its registry, uploading each disk chunk as soon as it is compressed",
    );
  return addSigningOptions(addTransferOptions(exportCmd))
    .addHelpText(
      "after",
      "\nExamples:\n  sarde export --vmconfig vm.json debian12 registry.example.org/sardines/debian12:latest" +
        "\n  sarde export --push debian12 registry.example.org/sardines/debian12:latest   # export and push at once",
    )
    .action(async (vm: string, image: string | undefined, o: ExportCli, cmd: Command) => {
      if (image && o.tag && image !== o.tag) {
        throw new SardeError("usage", "give the image name once: either --tag or the argument");
      }
      const s = settings(o);
      if (!o.push && o.signBySigstorePrivateKey !== undefined) {
        throw new SardeError("usage", "--sign-by-sigstore-private-key signs a push: add --push");
      }
      const sign = await signing(o);
      const compression = o.compression ?? "zstd";
      const chunkSize = o.chunksize;
      if (chunkSize !== undefined) {
        checkOption(cmd, "chunksize", (what) => checkChunkSize(chunkSize, compression, what));
      }
      const r = await sarde.exportVm(vm, image ?? o.tag, {
        ...s,
        vmConfig: o.vmconfig,
        libvirtConfig: o.libvirtconfig,
        compression,
        chunkSize,
        zstdLevel: o.zstdLevel,
        force: o.force,
        push: o.push ? { ...s, ...sign } : undefined,
      });
      info(`exported ${vm} as ${r.reference} (${r.files.length} file(s))`);
      if (r.pushed) info(summary("pushed", r.pushed));
      out(`${r.imageId.replace(/^sha256:/, "")}\n`);
    });
}
