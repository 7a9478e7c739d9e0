#!/bin/bash
# tools/setup.sh - install everything sarde needs to build and test on a fresh Debian 12 machine (as root).
# Idempotent: apt is skipped when every package is already installed (dpkg-query), npm ci when
# tools/node_modules already holds the deno version pinned in tools/package-lock.json (set
# SARDE_SETUP_FORCE=1 to reinstall), and deno install is quick with a warm cache. Progress: stderr.
#   1. Debian packages (libvirt, qemu, registry, skopeo, ...)
#   2. the pinned Deno runtime: npm ci --prefix tools  (tools/package-lock.json)
#   3. sarde's npm dependencies: deno install           (deno.lock, frozen)
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "setup: $*" >&2; }

PACKAGES=(
  libvirt-daemon-system libvirt-clients qemu-utils qemu-system-x86 zstd pigz
  libzstd1 # sarde compresses and decompresses with it (FFI); zstd(1) checks blobs in tests
  docker-registry apache2-utils skopeo
  openssh-client sshpass cpio kmod e2fsprogs curl openssl
  time # /usr/bin/time -f %M: peak RSS in deno task bench
  dropbear-bin # host key for the tiny test guest (tests/support/guest/build.sh)
  xorriso ovmf # cdrom ISO + UEFI vars template for test VMs (tests/support/vms.ts)
)

# --- 1. Debian packages ------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [ "$status" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  log "apt: all ${#PACKAGES[@]} packages already installed"
else
  if [ "$(id -u)" != 0 ]; then
    log "apt: missing ${missing[*]} and not root; install them first"
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  log "apt: updating package lists"
  apt-get update -qq </dev/null
  log "apt: installing ${missing[*]}"
  apt-get install -y -qq "${PACKAGES[@]}" </dev/null >/dev/null
  log "apt: done"
fi

# --- 2. Deno (pinned in tools/package.json) ----------------------------------------------------
pinned=""
if [ -f tools/package-lock.json ]; then
  pinned=$(node -p 'require("./tools/package-lock.json").packages["node_modules/deno"].version' 2>/dev/null || true)
fi
have=$(tools/node_modules/.bin/deno --version 2>/dev/null | sed -n 's/^deno \([^ ]*\).*/\1/p' || true)
if [ -z "$pinned" ]; then
  log "npm: tools/package-lock.json missing; npm install --prefix tools (commit the new lockfile)"
  npm install --prefix tools --no-audit --no-fund --loglevel=error </dev/null >&2
elif [ "$have" = "$pinned" ] && [ "${SARDE_SETUP_FORCE:-0}" != 1 ]; then
  log "npm: deno $have already installed in tools/node_modules (SARDE_SETUP_FORCE=1 reinstalls)"
else
  log "npm: npm ci --prefix tools (deno $pinned)"
  npm ci --prefix tools --no-audit --no-fund --loglevel=error </dev/null >&2
fi
export PATH="$PWD/tools/node_modules/.bin:$PATH"
log "deno: $(deno --version | head -1)"

# --- 3. sarde's npm dependencies (deno.lock, frozen) -------------------------------------------
log "deno: deno install --frozen"
deno install --frozen </dev/null >&2
log "ready"
