#!/usr/bin/env bash
# Release build: standalone binaries dist/sarde and dist/gitlab-sardinecake-executor via `deno compile`.
# `deno compile` needs the matching `denort` runtime, which it downloads from dl.deno.land on first use
# (or finds at $DENO_DIR/dl/release/v<version>/denort-<target>.zip, or at $DENORT_BIN). Where that is
# impossible (offline build machines), this script says so plainly instead of failing obscurely.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
deno=${DENO:-$root/tools/node_modules/.bin/deno}
[ -x "$deno" ] || deno=$(command -v deno)
target=${TARGET:-x86_64-unknown-linux-gnu}
mkdir -p dist
status=0
for prog in sarde:cli.ts gitlab-sardinecake-executor:executor.ts; do
  name=${prog%%:*}; entry=${prog#*:}
  log=$(mktemp)
  if "$deno" compile -A --v8-flags=--max-semi-space-size=1 --target "$target" --output "dist/$name" "$entry" >"$log" 2>&1; then
    echo "built dist/$name" >&2
  else
    status=1
    if grep -qiE 'denort|dl\.deno\.land|dns error|Setting up base binary' "$log"; then
      version=$("$deno" --version | head -1 | cut -d' ' -f2)
      denodir=$("$deno" info --json 2>/dev/null | sed -n 's/.*"denoDir": *"\([^"]*\)".*/\1/p')
      cat >&2 <<MSG
deno compile cannot build dist/$name here: it needs the Deno runtime 'denort' ($version, $target),
which it downloads from dl.deno.land, and this machine cannot reach it.
Do one of:
  - run 'deno task compile' on a machine with internet access (the release path), or
  - put denort-$target.zip at ${denodir:-\$DENO_DIR}/dl/release/v$version/, or
  - set DENORT_BIN=/path/to/denort.
Meanwhile 'deno task bundle' builds dist/sarde.js and dist/gitlab-sardinecake-executor.js,
which run anywhere Deno runs (bin/sarde uses them with SARDE_BUNDLE=1).
MSG
    else
      cat "$log" >&2
    fi
  fi
  rm -f "$log"
done
exit $status
