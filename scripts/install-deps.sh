#!/usr/bin/env bash
# Installs what warren's build and tests need on a fresh Debian 12 machine, idempotently.
# warren-proto's build uses a vendored protoc; etcd-client's needs the system one
# (install-etcd.sh). System packages:
# - busybox-static: the linux backend's tests build their busybox image from /bin/busybox;
# - docker-registry + skopeo: the pull test runs a real registry on loopback and pushes to it;
# - containerd: the shim's tests drive a private containerd 1.6 (scripts/containerd.sh);
# - systemd (systemd-analyze): the install test verifies the units it installs.
set -euo pipefail

need_apt=()
# `kill` and `ps` are used by the integration tests' process handling.
command -v kill >/dev/null || need_apt+=(procps)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
command -v docker-registry >/dev/null || need_apt+=(docker-registry)
command -v skopeo >/dev/null || need_apt+=(skopeo)
command -v containerd >/dev/null || need_apt+=(containerd)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# The linux backend's storage limit: `mkfs.ext4` makes the writable layer's file system,
# `mount` loop-mounts it; the open-file test runs the server under `prlimit`.
command -v mkfs.ext4 >/dev/null || need_apt+=(e2fsprogs)
command -v mount >/dev/null || need_apt+=(mount)
command -v prlimit >/dev/null || need_apt+=(util-linux)

if ((${#need_apt[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: need root to apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

# CRIU 4.x for checkpoint/restore, built from Debian's source package (scripts/install-criu.sh).
"$(dirname "$0")/install-criu.sh"
# etcd (the etcd store's tests start their own) and protoc (etcd-client's build needs one).
"$(dirname "$0")/install-etcd.sh"
# nftables, iproute2, nsenter: the linux backend's `network.mode: egress` (and its tests).
"$(dirname "$0")/install-egress.sh"

command -v cargo >/dev/null || { echo "install-deps: cargo (Rust 1.95) is required" >&2; exit 1; }
# The vm backend's `channel = "vhost-user-vsock"`: rust-vmm's vhost-device-vsock, from crates.io.
"$(dirname "$0")/install-vhost-vsock.sh"
# The vm backend: qemu, the minimal guest kernel (built from Debian's source, ~5 min once) and the initramfs with a static warren-guest.
"$(dirname "$0")/vm-assets.sh"
echo "install-deps: ok"
