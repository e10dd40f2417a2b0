#!/usr/bin/env bash
# Builds what the vm backend boots, from Debian's packages and this repository:
#   vmlinux          the guest kernel, an uncompressed ELF qemu boots directly (PVH), ~2x
#                    faster under TCG than decompressing a bzImage. By default warren's minimal
#                    kernel (scripts/build-guest-kernel.sh: Debian's linux-source-6.1 with
#                    crates/vm/kernel/guest.config, everything built in; ~5 min to build once),
#                    whose cold boots take ~0.55x the time of Debian's cloud kernel
#                    (docs/PERFORMANCE.md). WARREN_GUEST_KERNEL=debian takes Debian's cloud
#                    kernel (linux-image-cloud-amd64) instead, with its virtio modules;
#   initramfs.cpio   warren-guest as /init (static), busybox, and the modules a Debian kernel
#                    needs (none for the minimal one).
# Everything is cached by content: a second run only checks (cargo's no-op build included).
#
#   scripts/vm-assets.sh [OUT]     default OUT: $WARREN_VM_ASSETS, else target/vm-assets
#   scripts/vm-assets.sh --install DIR   also copies vmlinux and initramfs.cpio to DIR
#                                        (the server's default: /var/lib/warren/vm)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
install_dir=
if [ "${1:-}" = "--install" ]; then
  install_dir=${2:?--install needs a directory}
  shift 2
fi
out=${1:-${WARREN_VM_ASSETS:-$root/target/vm-assets}}
mkdir -p "$out"
out=$(cd "$out" && pwd)

kernel=${WARREN_GUEST_KERNEL:-minimal}
case "$kernel" in
  minimal | debian) ;;
  *)
    echo "vm-assets: WARREN_GUEST_KERNEL=$kernel: expected minimal or debian" >&2
    exit 1
    ;;
esac

# Debian's kernel has its virtio drivers as modules: loaded by warren-guest in this order.
modules=(
  kernel/drivers/virtio/virtio_ring.ko
  kernel/drivers/virtio/virtio.ko
  kernel/drivers/virtio/virtio_mmio.ko
  kernel/drivers/char/virtio_console.ko
  kernel/drivers/block/virtio_blk.ko
  kernel/drivers/char/hw_random/virtio-rng.ko
  kernel/fs/overlayfs/overlay.ko
)

need_apt=()
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
command -v lz4 >/dev/null || need_apt+=(lz4)
command -v xz >/dev/null || need_apt+=(xz-utils)
command -v mkfs.ext4 >/dev/null || need_apt+=(e2fsprogs)
[ -x /bin/busybox ] || need_apt+=(busybox-static)
if ((${#need_apt[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ "$kernel" = minimal ]; then
  kdir=$out/kernel/minimal
  "$root/scripts/build-guest-kernel.sh" "$kdir" >/dev/null
  modules=()
  ln -sfn "kernel/minimal/vmlinux" "$out/vmlinux"
else
  # --- Debian's kernel: the package linux-image-cloud-amd64 points at, extracted once.
  pkg=$(apt-cache show linux-image-cloud-amd64 2>/dev/null | awk '/^Depends:/ { print $2; exit }' || true)
  if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(apt-cache show linux-image-cloud-amd64 | awk '/^Depends:/ { print $2; exit }')
  fi
  kdir=$out/kernel/$pkg
  if [ ! -s "$kdir/vmlinux" ]; then
    echo "vm-assets: fetching $pkg"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && apt-get download -qq "$pkg" 2>/dev/null) || (cd "$tmp" && apt-get update -qq && apt-get download -qq "$pkg")
    dpkg -x "$tmp"/*.deb "$tmp/x"
    bz=$(ls "$tmp"/x/boot/vmlinuz-*)
    # The bzImage wraps the kernel compressed (lz4 for Debian's cloud kernel, xz for the
    # generic one): find the stream that decompresses to an ELF.
    found=
    for magic in '\x02\x21\x4c\x18:lz4 -dc' '\xfd7zXZ\x00:xz -dc' '\x28\xb5\x2f\xfd:zstd -dc' '\x1f\x8b\x08:gzip -dc'; do
      pattern=${magic%%:*}
      tool=${magic#*:}
      for off in $(LC_ALL=C grep -obUaP "$pattern" "$bz" | cut -d: -f1); do
        tail -c +$((off + 1)) "$bz" | $tool >"$tmp/vmlinux" 2>/dev/null || true
        if [ "$(head -c 4 "$tmp/vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ]; then
          found=1
          break 2
        fi
      done
    done
    [ -n "$found" ] || { echo "vm-assets: no kernel image found in $bz" >&2; exit 1; }
    mkdir -p "$kdir/modules"
    kver=$(ls "$tmp/x/lib/modules")
    for m in "${modules[@]}"; do
      cp "$tmp/x/lib/modules/$kver/$m" "$kdir/modules/"
    done
    echo "$kver" >"$kdir/version"
    mv "$tmp/vmlinux" "$kdir/vmlinux"
    rm -rf "$tmp"
    trap - EXIT
  fi
  ln -sfn "kernel/$pkg/vmlinux" "$out/vmlinux"
fi

# --- warren-guest, static (gnu target with crt-static; RUSTFLAGS reach only the target's
# crates because --target is given, so build scripts and proc macros stay dynamic). Its own
# target dir: the workspace's normal build is not disturbed.
RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" \
  cargo build --release --locked -q -p warren-guest \
  --target x86_64-unknown-linux-gnu --target-dir "$root/target/guest"
guest=$root/target/guest/x86_64-unknown-linux-gnu/release/warren-guest
if ! ldd "$guest" 2>&1 | grep -qE 'statically linked|not a dynamic executable'; then
  echo "vm-assets: $guest is not static" >&2
  exit 1
fi

# --- the initramfs, rebuilt only when an input changed.
sum=$( (sha256sum "$guest" /bin/busybox; ((${#modules[@]})) && sha256sum "$kdir"/modules/*.ko; echo "$kernel ${modules[*]} modes-3") | sha256sum | cut -c1-16)
if [ "$(cat "$out/initramfs.sum" 2>/dev/null)" != "$sum" ] || [ ! -s "$out/initramfs.cpio" ]; then
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  mkdir -p "$stage"/{bin,sbin,dev,proc,sys,run,tmp,etc,root}
  # The stage's modes are the guest's: / must not keep mktemp's 0700 (only root could
  # run anything), /tmp is everyone's.
  chmod 755 "$stage" "$stage"/{bin,sbin,dev,proc,sys,run,etc}
  chmod 1777 "$stage/tmp"
  chmod 700 "$stage/root"
  cp "$guest" "$stage/init"
  cp /bin/busybox "$stage/bin/busybox"
  for applet in $(/bin/busybox --list); do
    [ -e "$stage/bin/$applet" ] || ln -s busybox "$stage/bin/$applet"
  done
  for m in "${modules[@]}"; do
    mkdir -p "$stage/lib/modules/warren"
    cp "$kdir/modules/$(basename "$m")" "$stage/lib/modules/warren/"
    basename "$m" >>"$stage/lib/modules/warren/order"
  done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$stage/etc/passwd"
  echo 'root:x:0:' >"$stage/etc/group"
  # Files too, whatever the builder's umask.
  chmod 755 "$stage/init" "$stage/bin/busybox"
  chmod 644 "$stage/etc/passwd" "$stage/etc/group"
  [ -d "$stage/lib" ] && chmod -R u=rwX,go=rX "$stage/lib"
  # Uncompressed: under TCG the kernel unpacks a plain cpio faster than it inflates one.
  (cd "$stage" && find . | LC_ALL=C sort | /bin/busybox cpio -o -H newc 2>/dev/null) >"$out/initramfs.cpio.tmp"
  mv "$out/initramfs.cpio.tmp" "$out/initramfs.cpio"
  echo "$sum" >"$out/initramfs.sum"
  rm -rf "$stage"
  trap - EXIT
fi

if [ -n "$install_dir" ]; then
  mkdir -p "$install_dir"
  cp "$kdir/vmlinux" "$install_dir/vmlinux"
  cp "$out/initramfs.cpio" "$install_dir/initramfs.cpio"
fi
echo "vm-assets: $out/vmlinux ($(cat "$kdir/version")), $out/initramfs.cpio ($(du -h "$out/initramfs.cpio" | cut -f1))"
