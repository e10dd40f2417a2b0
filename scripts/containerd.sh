#!/usr/bin/env bash
# A private containerd for tests and experiments, never the system's one.
#   scripts/containerd.sh install      apt-get install containerd when it is missing (root)
#   scripts/containerd.sh start DIR [--cri IMAGE]
#                                      start containerd on DIR/{root,state,containerd.sock}; prints its pid.
#                                      --cri: with the CRI plugin, warren the default runtime, pods'
#                                      `resources.*`/`warren.dev/*` annotations passed on, IMAGE as the
#                                      sandbox (pause) image (import it into namespace k8s.io first)
#   scripts/containerd.sh stop DIR     stop it, unmount what it left under DIR
#   scripts/containerd.sh ctr DIR ...  ctr against it
# Everything lives under DIR: root, state, sockets, config, log and ctr's FIFOs (use
# `ctr run --fifo-dir DIR/fifo`). Without --cri, the CRI plugin and everything that needs a
# network is off; with it, only host-network pods work (no CNI is configured).
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
  local dir=$1 cri_image=${2:-}
  local cri='  "io.containerd.grpc.v1.cri",'
  [ -n "$cri_image" ] && cri=''
  cat <<CONF
# A private containerd 1.6 (config format v2), written by scripts/containerd.sh.
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = [
$cri
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
  [ -n "$cri_image" ] || return 0
  cat <<CONF
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$cri_image"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    disable_apparmor = true
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "$dir/cni/bin"
      conf_dir = "$dir/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "warren"
      snapshotter = "overlayfs"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.warren]
        runtime_type = "io.containerd.warren.v1"
        pod_annotations = ["resources.*", "warren.dev/*"]
        container_annotations = ["resources.*", "warren.dev/*"]
CONF
}

start() {
  local dir=${1:?usage: containerd.sh start DIR [--cri IMAGE]} cri_image=
  if [ "${2:-}" = "--cri" ]; then
    cri_image=${3:?usage: containerd.sh start DIR --cri IMAGE}
  fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  command -v containerd >/dev/null || die "containerd is not installed (containerd.sh install)"
  mkdir -p "$dir/root" "$dir/state" "$dir/fifo"
  config "$dir" "$cri_image" >"$dir/config.toml"
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
  start) shift; start "$@" ;;
  stop) stop "${2:-}" ;;
  ctr) shift; d=${1:?usage: containerd.sh ctr DIR ARGS}; shift; exec ctr --address "$d/containerd.sock" "$@" ;;
  *) die "usage: containerd.sh install | start DIR [--cri IMAGE] | stop DIR | ctr DIR ARGS..." ;;
esac
