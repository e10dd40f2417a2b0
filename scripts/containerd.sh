#!/usr/bin/env bash
# A private containerd for tests and experiments, never the system's one.
#   scripts/containerd.sh install      apt-get install containerd when it is missing (root)
#   scripts/containerd.sh start DIR    start containerd on DIR/{root,state,containerd.sock}; prints its pid
#   scripts/containerd.sh stop DIR     stop it, unmount what it left under DIR
#   scripts/containerd.sh ctr DIR ...  ctr against it
# Everything lives under DIR: root, state, sockets, config, log and ctr's FIFOs (use
# `ctr run --fifo-dir DIR/fifo`). The CRI plugin and everything that needs a network is off.
# Shims are found on PATH: put containerd-shim-warren-v1 on it before `start`.
set -euo pipefail

die() { echo "containerd.sh: $*" >&2; exit 1; }

install() {
  command -v containerd >/dev/null && command -v ctr >/dev/null && return 0
  [ "$(id -u)" -eq 0 ] || die "need root to apt-get install containerd"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends containerd
  command -v containerd >/dev/null || die "containerd is still missing after apt-get install"
}

config() {
  local dir=$1
  cat <<CONF
# A private containerd 1.6 (config format v2), written by scripts/containerd.sh.
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
]

[grpc]
  address = "$dir/containerd.sock"

[ttrpc]
  address = "$dir/containerd.sock.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "$dir/opt"
CONF
}

start() {
  local dir=${1:?usage: containerd.sh start DIR}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  command -v containerd >/dev/null || die "containerd is not installed (containerd.sh install)"
  mkdir -p "$dir/root" "$dir/state" "$dir/fifo"
  config "$dir" >"$dir/config.toml"
  # setsid: its own session, so the caller's terminal signals do not reach it.
  setsid containerd --config "$dir/config.toml" >"$dir/containerd.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$dir/containerd.pid"
  local i
  for i in $(seq 1 200); do
    if ctr --address "$dir/containerd.sock" version >/dev/null 2>&1; then
      echo "$pid"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$dir/containerd.log" >&2; die "containerd exited at start-up"; }
    sleep 0.05
  done
  kill "$pid" 2>/dev/null || true
  cat "$dir/containerd.log" >&2
  die "containerd did not answer on $dir/containerd.sock within 10 s"
}

stop() {
  local dir=${1:?usage: containerd.sh stop DIR}
  dir=$(cd "$dir" && pwd)
  if [ -f "$dir/containerd.pid" ]; then
    local pid i
    pid=$(cat "$dir/containerd.pid")
    if kill "$pid" 2>/dev/null; then
      for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/containerd.pid"
  fi
  # Snapshot and rootfs mounts left under DIR, deepest first.
  awk -v d="$dir/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

case "${1:-}" in
  install) install ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  ctr) shift; d=${1:?usage: containerd.sh ctr DIR ARGS}; shift; exec ctr --address "$d/containerd.sock" "$@" ;;
  *) die "usage: containerd.sh install | start DIR | stop DIR | ctr DIR ARGS..." ;;
esac
