#!/usr/bin/env bash
# Installs rust-vmm's vhost-device-vsock (crates.io, a pinned version, its own Cargo.lock) to
# /usr/local/bin, idempotently (called by install-deps.sh; ~1 min to build once). The vm
# backend starts one per VM for `channel = "vhost-user-vsock"`: virtio-vsock to the guest
# without the host kernel's vhost_vsock module (docs/vm.md).
#
#   scripts/install-vhost-vsock.sh [ROOT]     default ROOT: /usr/local (the binary in ROOT/bin)
set -euo pipefail
version=0.3.0
root=${1:-/usr/local}
bin=$root/bin/vhost-device-vsock
if [ -x "$bin" ] && [ "$(cat "$root/share/warren/vhost-device-vsock.version" 2>/dev/null)" = "$version" ]; then
  echo "install-vhost-vsock: vhost-device-vsock $version ($bin)"
  exit 0
fi
command -v cargo >/dev/null || { echo "install-vhost-vsock: cargo is required" >&2; exit 1; }
echo "install-vhost-vsock: building vhost-device-vsock $version" >&2
cargo install --quiet --locked --force --root "$root" vhost-device-vsock --version "$version"
mkdir -p "$root/share/warren"
echo "$version" >"$root/share/warren/vhost-device-vsock.version"
echo "install-vhost-vsock: vhost-device-vsock $version ($bin)"
