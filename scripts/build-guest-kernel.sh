#!/usr/bin/env bash
# Builds warren's minimal guest kernel from Debian's kernel source package (linux-source-6.1):
# `make tinyconfig`, then crates/vm/kernel/guest.config merged over it (everything the guest
# needs built in, no modules), then `make vmlinux`. The result is an uncompressed ELF that qemu
# boots directly (PVH).
#
#   scripts/build-guest-kernel.sh OUT_DIR    prints the path of OUT_DIR/vmlinux at the end
#
# Cached by content: OUT_DIR/vmlinux is rebuilt only when the source package's version or the
# config fragment changed (OUT_DIR/vmlinux.sum). The source tree is unpacked under
# target/guest-kernel (~1.5 GB) and kept, so a rebuild after a config change is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=${1:?usage: scripts/build-guest-kernel.sh OUT_DIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
fragment=$root/crates/vm/kernel/guest.config

need_apt=()
for tool in make gcc flex bison bc perl xz; do
  command -v $tool >/dev/null || need_apt+=("$([ $tool = xz ] && echo xz-utils || echo $tool)")
done
[ -e /usr/include/libelf.h ] || need_apt+=(libelf-dev)
if ((${#need_apt[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

version=$(apt-cache policy linux-source-6.1 2>/dev/null | awk '/Candidate:/ { print $2 }')
if [ -z "$version" ] || [ "$version" = "(none)" ]; then
  apt-get update -qq
  version=$(apt-cache policy linux-source-6.1 | awk '/Candidate:/ { print $2 }')
fi
sum=$( (echo "$version"; cat "$fragment") | sha256sum | cut -c1-16)
if [ "$(cat "$out/vmlinux.sum" 2>/dev/null)" = "$sum" ] && [ -s "$out/vmlinux" ]; then
  echo "$out/vmlinux"
  exit 0
fi

work=$root/target/guest-kernel
src=$work/linux-source-6.1
if [ "$(cat "$work/source.version" 2>/dev/null)" != "$version" ] || [ ! -d "$src" ]; then
  echo "build-guest-kernel: unpacking linux-source-6.1 $version" >&2
  rm -rf "$work"
  mkdir -p "$work"
  (cd "$work" && apt-get download -qq "linux-source-6.1=$version")
  dpkg-deb --fsys-tarfile "$work"/linux-source-6.1_*.deb |
    tar -x -O ./usr/src/linux-source-6.1.tar.xz | xz -dc -T0 | tar -x -C "$work"
  rm -f "$work"/linux-source-6.1_*.deb
  echo "$version" >"$work/source.version"
fi

echo "build-guest-kernel: configuring" >&2
# (kbuild rebuilds only what a changed option touches, so reconfiguring every time is cheap.)
make -C "$src" -s ARCH=x86_64 tinyconfig >/dev/null
(cd "$src" && scripts/kconfig/merge_config.sh -m .config "$fragment" >/dev/null 2>&1)
make -C "$src" -s ARCH=x86_64 olddefconfig >/dev/null
# Kconfig drops what a dependency does not allow: every line of the fragment must hold.
missing=$(grep -E '^(CONFIG_|# CONFIG_.* is not set$)' "$fragment" | while read -r line; do
  if [[ $line == "# "* ]]; then
    name=${line#\# }
    name=${name%% *}
    ! grep -q "^$name=" "$src/.config" || echo "$line"
  else
    grep -qxF "$line" "$src/.config" || echo "$line"
  fi
done)
if [ -n "$missing" ]; then
  echo "build-guest-kernel: not set in the final config:" >&2
  echo "$missing" >&2
  exit 1
fi

echo "build-guest-kernel: building vmlinux (linux-source-6.1 $version, $(nproc) jobs)" >&2
started=$(date +%s)
make -C "$src" -s ARCH=x86_64 -j"$(nproc)" vmlinux >/dev/null
cp "$src/vmlinux" "$out/vmlinux.tmp"
strip --strip-debug "$out/vmlinux.tmp" 2>/dev/null || true
mv "$out/vmlinux.tmp" "$out/vmlinux"
echo "$sum" >"$out/vmlinux.sum"
echo "linux-source-6.1 $version, warren guest config $sum" >"$out/version"
echo "build-guest-kernel: built in $(($(date +%s) - started)) s" >&2
echo "$out/vmlinux"
