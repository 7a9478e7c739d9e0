#!/bin/bash
# tools/libvirtd.sh start|stop|status - run libvirt's monolithic daemon (libvirtd + virtlogd) by hand,
# without systemd (Debian 12 ships libvirt 9.0.0 with only the monolithic libvirtd).
# Idempotent. Never starts libvirt's "default" network (tests use user-mode networking).
# Logs go to /var/log/libvirt/libvirtd.log (there is no syslog daemon on CI machines).
set -euo pipefail

ACTION=${1:-start}
LIBVIRTD_PID=/run/libvirtd.pid
VIRTLOGD_PID=/run/virtlogd.pid
SOCK=/run/libvirt/libvirt-sock
CONF=/etc/libvirt/libvirtd.conf

log() { echo "libvirtd.sh: $*" >&2; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_one() { # PIDFILE NAME
  local pidfile=$1 name=$2 pid
  if alive "$pidfile"; then
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "$name ($pid) did not stop; sending SIGKILL"
      kill -9 "$pid" 2>/dev/null || true
    fi
    log "$name stopped"
  fi
  rm -f "$pidfile"
}

case $ACTION in
start) ;;
stop)
  stop_one "$LIBVIRTD_PID" libvirtd
  stop_one "$VIRTLOGD_PID" virtlogd
  exit 0
  ;;
status)
  rc=0
  for p in "$VIRTLOGD_PID" "$LIBVIRTD_PID"; do
    if alive "$p"; then echo "$(basename "$p" .pid): running (pid $(cat "$p"))"; else
      echo "$(basename "$p" .pid): stopped"
      rc=3
    fi
  done
  exit $rc
  ;;
*)
  echo "usage: $0 start|stop|status" >&2
  exit 2
  ;;
esac

if [ ! -x /usr/sbin/libvirtd ]; then
  log "/usr/sbin/libvirtd not found; run tools/setup.sh first"
  exit 1
fi

mkdir -p /run/libvirt /var/log/libvirt
# log to a file instead of syslog
if [ -f "$CONF" ] && ! grep -q '^log_outputs' "$CONF"; then
  echo 'log_outputs="3:file:/var/log/libvirt/libvirtd.log"' >>"$CONF"
fi

# never autostart libvirt's "default" NAT network (it would create virbr0 on 192.168.122.1 and
# run dnsmasq); sarde's tests only use user-mode networking on loopback
if [ -L /etc/libvirt/qemu/networks/autostart/default.xml ]; then
  rm -f /etc/libvirt/qemu/networks/autostart/default.xml
  log "disabled autostart of libvirt's default network"
fi

# qemu's stdio goes through virtlogd, so it must run before any domain starts
if ! alive "$VIRTLOGD_PID"; then
  rm -f /run/libvirt/virtlogd-sock /run/libvirt/virtlogd-admin-sock
  /usr/sbin/virtlogd -d </dev/null
  log "virtlogd started"
fi

if ! alive "$LIBVIRTD_PID"; then
  # stale sockets from a killed daemon make the next start fail
  rm -f "$SOCK" /run/libvirt/libvirt-sock-ro /run/libvirt/libvirt-admin-sock
  /usr/sbin/libvirtd -d </dev/null # NOT -l (that wants TLS certs)
  log "libvirtd started"
fi

for _ in $(seq 1 100); do
  [ -S "$SOCK" ] && break
  sleep 0.1
done
if [ ! -S "$SOCK" ]; then
  log "libvirtd socket $SOCK did not appear; log tail:"
  tail -n 20 /var/log/libvirt/libvirtd.log >&2 2>/dev/null || true
  exit 1
fi

# the first connection probes QEMU capabilities (~8 s on a cold cache); do it once here
if ! virsh -c qemu:///system version </dev/null >/dev/null; then
  log "virsh -c qemu:///system version failed"
  exit 1
fi
log "ready: virtlogd pid $(cat "$VIRTLOGD_PID"), libvirtd pid $(cat "$LIBVIRTD_PID")"
