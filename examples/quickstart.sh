#!/usr/bin/env bash
# Quick start on a fresh Debian 12 machine (as root): installs what sarde needs, starts libvirtd and
# a throw-away registry on 127.0.0.1, exports a tiny VM, pushes it, pulls it back as a VM and runs
# a CI job in a clone of it through the GitLab executor. Everything it creates is removed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/tools/setup.sh"
bash "$root/tools/libvirtd.sh" start >&2
export PATH="$root/tools/node_modules/.bin:$PATH" RUST_BACKTRACE=0
exec deno run -A --quiet --config "$root/deno.json" "$root/examples/quickstart.ts" "$@"
