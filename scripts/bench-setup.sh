#!/usr/bin/env bash
# Installs the peers the benchmarks compare warren with, and prepares the host for them.
# Slow (the wasmtime CLI builds from source for ~13 minutes), so never part of CI.
#   scripts/bench-setup.sh            everything
#   scripts/bench-setup.sh linux      only what `bench run -b linux` needs (crun, runc, cgroups)
#   scripts/bench-setup.sh wasm       only the wasmtime CLI
set -euo pipefail
what="${1:-all}"

setup_wasm() {
  if ! command -v wasmtime >/dev/null; then
    # 48.0.8 is the newest wasmtime that builds with Rust 1.95; a plain install picks a newer one.
    cargo install wasmtime-cli@48.0.8 --locked
  fi
  wasmtime --version
}

setup_linux() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "bench-setup: the linux peers need root (apt-get, cgroup mounts)" >&2
    exit 1
  fi
  local need=()
  command -v crun >/dev/null || need+=(crun)
  command -v runc >/dev/null || need+=(runc)
  [ -x /bin/busybox ] || need+=(busybox-static)
  if ((${#need[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  fi
  # crun refuses a hybrid cgroup layout (v1 hierarchies under a tmpfs /sys/fs/cgroup plus a
  # cgroup2 mount) while the cgroup2 mount has controllers; on this machine kind its only one
  # is hugetlb. Mounting hugetlb as a v1 hierarchy takes it away from cgroup2. warren's linux
  # backend does not use hugetlb, so this changes nothing for it.
  local root_fs
  root_fs=$(stat -f -c %T /sys/fs/cgroup)
  if [ "$root_fs" = tmpfs ] && ! mountpoint -q /sys/fs/cgroup/hugetlb; then
    local unified
    # The filesystem type follows the " - " separator (optional fields come before it).
    unified=$(awk '{ for (i = 7; i < NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") { print $5; exit } break } }' /proc/self/mountinfo)
    if [ -n "$unified" ] && grep -qw hugetlb "$unified/cgroup.controllers" 2>/dev/null; then
      # /sys/fs/cgroup is a read-only tmpfs on some systems: make it writable for the mkdir.
      mkdir -p /sys/fs/cgroup/hugetlb 2>/dev/null || {
        mount -o remount,rw /sys/fs/cgroup
        mkdir -p /sys/fs/cgroup/hugetlb
      }
      mount -t cgroup -o hugetlb cgroup /sys/fs/cgroup/hugetlb
      echo "bench-setup: mounted the hugetlb v1 hierarchy at /sys/fs/cgroup/hugetlb (for crun)"
    fi
  fi
  crun --version | head -n 1
  runc --version | head -n 1
}

case "$what" in
  all) setup_linux; setup_wasm ;;
  linux) setup_linux ;;
  wasm) setup_wasm ;;
  *) echo "usage: scripts/bench-setup.sh [all|linux|wasm]" >&2; exit 2 ;;
esac
