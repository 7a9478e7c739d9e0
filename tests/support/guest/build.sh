#!/bin/bash
# tests/support/guest/build.sh [OUTDIR] - build sarde's tiny x86_64 test guest from Debian packages.
#
# Everything comes from Debian packages fetched with `apt-get download` and unpacked with
# `dpkg-deb -x` (nothing is installed on the host): the Debian cloud kernel, busybox-static,
# dropbear-bin and its libraries, bash and glibc. No root, mount or loop device is needed to build
# (but libvirt tests run as root anyway).
#
# Output in OUTDIR (default /var/tmp/sarde-tiny-guest, made world-traversable for libvirt-qemu):
#   vmlinuz           the kernel, for direct kernel boot
#   initrd.img        gzip'd cpio (busybox init + dropbear + bash); with `sarde.root=/dev/vda` on
#                     the kernel command line it mounts that ext4 disk and switch_roots into it,
#                     otherwise the guest runs from RAM
#   rootfs.qcow2      256 MiB ext4 root disk (same tree, made with `mkfs.ext4 -d`), state persists
#   cmdline           the kernel command line to use: `console=ttyS0 sarde.root=/dev/vda`
#   id_ed25519[.pub]  client key authorised for root (kept across rebuilds)
#   password          root's password (`sarde`), also accepted by dropbear
#   host_ed25519.pub  the guest's SSH host key (OpenSSH format; kept across rebuilds)
#   stamp             build version stamp plus the package versions used; written last
#
# Guest: eth0 by DHCP (udhcpc), falling back to 10.0.2.15/24 via 10.0.2.2 (QEMU user-mode
# networking); dropbear on :22; acpid turns the ACPI power button into `poweroff` (so `virsh
# shutdown` works); root's shell is bash. The serial console shows `SARDE-TINY-GUEST READY` once
# the network is configured (dropbear starts right after).
#
# Idempotent and cached: when OUTDIR holds every output and `stamp` matches this script's version
# (a hash of this file), it exits at once. Downloaded .deb files are kept in OUTDIR/.debs.
# Concurrent runs on the same OUTDIR are serialised with flock(1). A rebuild (this script changed)
# replaces rootfs.qcow2, so overlays made on the old one must not be booted again afterwards.
#
# Host tools: apt-get (package lists present: `apt-get update`), dpkg-deb, cpio, gzip, kmod
# (depmod, modprobe), e2fsprogs (mkfs.ext4, debugfs), qemu-img, ssh-keygen, openssl, dropbearkey
# (dropbear-bin), flock. All are in tools/setup.sh.
set -euo pipefail
export PATH=$PATH:/usr/sbin:/sbin # mkfs.ext4, depmod, debugfs for non-root users

OUT=${1:-/var/tmp/sarde-tiny-guest}
PASSWORD=sarde
ROOT_SIZE=256M
KMETA=linux-image-cloud-amd64
# Library packages for dropbear and bash; the build checks that ld.so finds every library in them.
LIBPKGS=(libc6 libcrypt1 libtomcrypt1 libtommath1 libgmp10 zlib1g libtinfo6)
MODULES=(virtio_pci virtio_net virtio_blk virtio-rng button evdev)
OUTPUTS=(vmlinuz initrd.img rootfs.qcow2 cmdline id_ed25519 id_ed25519.pub password
  host_ed25519.pub stamp)

log() { echo "guest/build.sh: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}

SELF=$(readlink -f "${BASH_SOURCE[0]}")
VERSION="sarde-tiny-guest 1 $(sha256sum "$SELF" | cut -c1-16)"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
chmod 755 "$OUT" 2>/dev/null || true

complete() {
  local f
  for f in "${OUTPUTS[@]}"; do [ -s "$OUT/$f" ] || return 1; done
  [ "$(head -1 "$OUT/stamp")" = "$VERSION" ]
}

exec 9>"$OUT/.lock"
flock 9
if complete; then
  exit 0
fi

for t in apt-get apt-cache dpkg-deb cpio gzip depmod modprobe mkfs.ext4 qemu-img ssh-keygen \
  openssl dropbearkey sha256sum; do
  command -v "$t" >/dev/null 2>&1 || die "missing tool: $t (run tools/setup.sh)"
done

START=$(date +%s.%N)
log "building $OUT ($VERSION)"
rm -f "$OUT/stamp"
WORK=$(mktemp -d "$OUT/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- 1. download (cached) and unpack the packages --------------------------------------------
KPKG=$(apt-cache depends "$KMETA" 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
[ -n "$KPKG" ] || die "cannot resolve $KMETA (no package lists? run apt-get update)"
KVER=${KPKG#linux-image-}
PKGS=("$KPKG" busybox-static dropbear-bin bash "${LIBPKGS[@]}")

APTOPTS=(-q)
[ "$(id -u)" = 0 ] && APTOPTS+=(-o APT::Sandbox::User=root)
DEBS=$OUT/.debs
mkdir -p "$DEBS"
# --print-uris: 'URL' FILENAME SIZE HASH, one line per package (nothing is downloaded)
mkdir "$WORK/empty" # (--print-uris leaves out packages whose file is already in the cwd)
mapfile -t FILES < <(cd "$WORK/empty" && apt-get "${APTOPTS[@]}" download --print-uris "${PKGS[@]}" |
  awk '{print $2}')
[ ${#FILES[@]} -eq ${#PKGS[@]} ] || die "apt-get download --print-uris: ${FILES[*]}"
want=()
for f in "${FILES[@]}"; do [ -s "$DEBS/$f" ] || want+=("${f%%_*}"); done # NAME_VERSION_ARCH.deb
if [ ${#want[@]} -gt 0 ]; then
  log "downloading ${want[*]}"
  (cd "$DEBS" && apt-get "${APTOPTS[@]}" download "${want[@]}" >/dev/null)
fi
for f in "$DEBS"/*.deb; do # drop debs of older versions
  keep=0
  for g in "${FILES[@]}"; do [ "$f" = "$DEBS/$g" ] && keep=1; done
  [ $keep = 1 ] || rm -f "$f"
done

X=$WORK/x
mkdir -p "$X"
for f in "${FILES[@]}"; do dpkg-deb -x "$DEBS/$f" "$X"; done
[ -f "$X/boot/vmlinuz-$KVER" ] || die "no kernel in $KPKG"
depmod -b "$X" "$KVER"

# --- 2. the guest's file tree ----------------------------------------------------------------
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc/dropbear,etc/acpi/PWRF,proc,sys,dev,tmp,run,mnt} \
  "$R"/{root/.ssh,data,lib/modules,lib64,lib/x86_64-linux-gnu,var/log,var/tmp,home}
chmod 1777 "$R/tmp" "$R/var/tmp"

cp "$X/bin/bash" "$R/bin/bash"
ln -s /bin/bash "$R/usr/bin/bash"
cp "$X/bin/busybox" "$R/bin/busybox"
for a in $("$X/bin/busybox" --list-full); do
  [ -e "$R/$a" ] || [ -L "$R/$a" ] || ln -s /bin/busybox "$R/$a"
done
cp "$X/usr/sbin/dropbear" "$R/usr/sbin/dropbear"

# Shared libraries, resolved by the unpacked glibc's ld.so against the unpacked packages only.
LDSO=$X/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
LIBPATH=$X/lib/x86_64-linux-gnu:$X/usr/lib/x86_64-linux-gnu
cp -L "$LDSO" "$R/lib64/ld-linux-x86-64.so.2"
for bin in "$R/bin/bash" "$R/usr/sbin/dropbear"; do
  "$LDSO" --library-path "$LIBPATH" --list "$bin" | awk '/=>/ && $1 !~ /^\//{print $1, $3}' |
    while read -r name path; do
      case $path in
      "$X"/*) cp -L "$path" "$R/lib/x86_64-linux-gnu/$name" ;;
      *) die "$(basename "$bin") needs $name, not found in ${LIBPKGS[*]} (got '$path')" ;;
      esac
    done
done

# Kernel modules in load order (dependencies first), from modprobe against the unpacked tree.
: >"$R/etc/modules.load"
for m in "${MODULES[@]}"; do
  modprobe -d "$X" -S "$KVER" --show-depends "$m" | awk '$1=="insmod"{print $2}'
done | awk '!seen[$0]++' | while read -r f; do
  cp "$f" "$R/lib/modules/"
  basename "$f" >>"$R/etc/modules.load"
done
[ -s "$R/etc/modules.load" ] || die "no kernel modules found"

# Keys: the client key and the host key survive rebuilds (VMs built earlier stay reachable).
[ -s "$OUT/id_ed25519" ] ||
  ssh-keygen -q -t ed25519 -N '' -C sarde-tiny-guest -f "$OUT/id_ed25519" </dev/null
[ -s "$OUT/.host_ed25519" ] || {
  rm -f "$OUT/.host_ed25519"
  dropbearkey -t ed25519 -f "$OUT/.host_ed25519" >/dev/null 2>&1
}
dropbearkey -y -f "$OUT/.host_ed25519" | grep '^ssh-ed25519 ' >"$WORK/host_ed25519.pub"
cp "$OUT/.host_ed25519" "$R/etc/dropbear/dropbear_ed25519_host_key"
chmod 600 "$R/etc/dropbear/dropbear_ed25519_host_key"
cp "$OUT/id_ed25519.pub" "$R/root/.ssh/authorized_keys"
chmod 700 "$R/root" "$R/root/.ssh"
chmod 600 "$R/root/.ssh/authorized_keys"

HASH=$(openssl passwd -6 "$PASSWORD")
echo "root:x:0:0:root:/root:/bin/bash" >"$R/etc/passwd"
echo "root:$HASH:19000:0:99999:7:::" >"$R/etc/shadow"
chmod 600 "$R/etc/shadow"
echo "root:x:0:" >"$R/etc/group"
printf '/bin/sh\n/bin/ash\n/bin/bash\n/usr/bin/bash\n' >"$R/etc/shells"
echo sarde-tiny >"$R/etc/hostname"
echo "127.0.0.1 localhost sarde-tiny" >"$R/etc/hosts"
printf 'PATH=/usr/sbin:/usr/bin:/sbin:/bin\nexport PATH\n' >"$R/etc/profile"
: >"$R/etc/resolv.conf"
echo "$VERSION" >"$R/etc/sarde-tiny-guest"

# PID 1 of the initramfs. With sarde.root=DEV: load the virtio modules, mount DEV (ext4) and
# switch_root into it; otherwise (or if that fails) run busybox init from RAM.
cat >"$R/init" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
ROOTDEV=$(sed -n 's/.*sarde\.root=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -n "$ROOTDEV" ]; then
  while read -r ko; do insmod "/lib/modules/$ko" 2>/dev/null; done </etc/modules.load
  i=0
  while [ ! -b "$ROOTDEV" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  mkdir -p /newroot
  # -L as well: on merged-/usr systems /sbin/init is an absolute symlink
  if mount -t ext4 "$ROOTDEV" /newroot && { [ -x /newroot/sbin/init ] || [ -L /newroot/sbin/init ]; }; then
    umount /proc /sys
    mount --move /dev /newroot/dev
    exec switch_root /newroot /sbin/init
  fi
  echo "sarde: cannot mount $ROOTDEV as the root, running from the initramfs"
fi
exec /sbin/init
EOF
chmod 755 "$R/init"

cat >"$R/etc/inittab" <<'EOF'
::sysinit:/etc/rcS
::respawn:/usr/sbin/dropbear -F -E -p 22 -r /etc/dropbear/dropbear_ed25519_host_key
::respawn:/sbin/acpid -f
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
::shutdown:/bin/umount -a -r
EOF

cat >"$R/etc/rcS" <<'EOF'
#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mounted() { grep -q "^[^ ]* $1 " /proc/mounts 2>/dev/null; } # (busybox has no mountpoint)
mounted /proc || mount -t proc proc /proc
mounted /sys || mount -t sysfs sysfs /sys
mounted /dev || mount -t devtmpfs devtmpfs /dev
mount -o remount,rw / 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
while read -r ko; do insmod "/lib/modules/$ko" 2>/dev/null; done </etc/modules.load
hostname -F /etc/hostname
ip link set lo up
IF=$(ls /sys/class/net | grep -v '^lo$' | head -1)
if [ -n "$IF" ]; then
  ip link set "$IF" up
  udhcpc -i "$IF" -s /etc/udhcpc.sh -q -n -t 3 -T 1 >/dev/null 2>&1 || {
    ip addr add 10.0.2.15/24 dev "$IF"
    ip route add default via 10.0.2.2
  }
fi
# a second virtio disk with a filesystem, if any, goes to /data
ROOTDEV=$(sed -n 's/.*sarde\.root=\([^ ]*\).*/\1/p' /proc/cmdline)
for d in /dev/vda /dev/vdb; do
  [ "$d" = "$ROOTDEV" ] && continue
  [ -b "$d" ] && { mount "$d" /data 2>/dev/null || mount -o ro "$d" /data 2>/dev/null; break; }
done
{
  echo "sarde: uptime $(cut -d' ' -f1 /proc/uptime)s, root $(grep ' / ' /proc/mounts | tail -1)"
  ip -4 addr show | grep inet
  echo "SARDE-TINY-GUEST READY"
} >/dev/console
EOF
chmod 755 "$R/etc/rcS"

cat >"$R/etc/udhcpc.sh" <<'EOF'
#!/bin/sh
case "$1" in
bound | renew)
  ip addr flush dev "$interface"
  ip addr add "$ip/${mask:-24}" dev "$interface"
  [ -n "$router" ] && ip route add default via "${router%% *}" dev "$interface"
  : >/etc/resolv.conf
  for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
  ;;
deconfig) ip addr flush dev "$interface" ;;
esac
exit 0
EOF
chmod 755 "$R/etc/udhcpc.sh"
printf '#!/bin/sh\n/sbin/poweroff\n' >"$R/etc/acpi/PWRF/00000080"
chmod 755 "$R/etc/acpi/PWRF/00000080"

# --- 3. initramfs, root disk -----------------------------------------------------------------
S=$WORK/out
mkdir -p "$S"
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet | gzip -6) >"$S/initrd.img"
cp "$X/boot/vmlinuz-$KVER" "$S/vmlinuz"
echo "console=ttyS0 sarde.root=/dev/vda" >"$S/cmdline"

truncate -s "$ROOT_SIZE" "$WORK/rootfs.raw"
mkfs.ext4 -q -F -L sarderoot -E root_owner=0:0 -d "$R" "$WORK/rootfs.raw"
if [ "$(id -u)" != 0 ]; then
  # mkfs.ext4 -d copies the builder's uid/gid: make every inode root's
  (cd "$R" && find . -mindepth 1 | sed 's|^\.||') | while read -r p; do
    printf 'sif "%s" uid 0\nsif "%s" gid 0\n' "$p" "$p"
  done | debugfs -w -f - "$WORK/rootfs.raw" >/dev/null 2>&1
fi
qemu-img convert -f raw -O qcow2 "$WORK/rootfs.raw" "$S/rootfs.qcow2"
cp "$WORK/host_ed25519.pub" "$S/host_ed25519.pub"
echo "$PASSWORD" >"$S/password"

# --- 4. install into OUTDIR; the stamp goes last ----------------------------------------------
chmod 644 "$S"/*
for f in vmlinuz initrd.img rootfs.qcow2 cmdline password host_ed25519.pub; do
  mv -f "$S/$f" "$OUT/$f"
done
{
  echo "$VERSION"
  for f in "${FILES[@]}"; do echo "${f%.deb}"; done
} >"$WORK/stamp"
mv -f "$WORK/stamp" "$OUT/stamp"
log "done in $(awk -v s="$START" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e-s}')s:" \
  "$KPKG, initrd $(du -h "$OUT/initrd.img" | cut -f1), rootfs.qcow2 $(du -h "$OUT/rootfs.qcow2" | cut -f1)"
