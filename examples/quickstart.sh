#!/usr/bin/env bash
# Quick start on a fresh Debian 12 machine (as root): installs what sarde needs, starts a throw-away
# registry on 127.0.0.1, makes a small VM-like image, pushes it, fetches it back into an empty
# store and lists it. Everything it creates lives under one temp folder, removed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/tools/setup.sh"
export PATH="$root/tools/node_modules/.bin:$PATH" RUST_BACKTRACE=0
exec deno run -A --quiet --config "$root/deno.json" "$root/examples/quickstart.ts" "$@"
