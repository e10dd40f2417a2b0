#!/usr/bin/env bash
# Installs warren's binaries and systemd units. Touches nothing outside the directories it is
# given (and runs no systemctl) unless asked with --enable.
#
#   scripts/install.sh [--prefix DIR] [--destdir DIR] [--unit-dir DIR]
#                      [--no-build] [--bin-dir DIR] [--enable]
#
#   --prefix DIR    binaries go to DIR/bin, and the units run them from there (default /usr/local)
#   --destdir DIR   stage everything under DIR (packaging); also read from $DESTDIR
#   --unit-dir DIR  where the units go (default /etc/systemd/system)
#   --no-build      install what --bin-dir holds instead of running `cargo build --release`
#   --bin-dir DIR   where the built binaries are (default ${CARGO_TARGET_DIR:-target}/release)
#   --enable        then `systemctl daemon-reload` and enable the units (not with --destdir)
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
destdir=${DESTDIR:-}
unit_dir=/etc/systemd/system
build=1
bin_dir=
enable=0
while (($#)); do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --destdir) destdir=${2:?--destdir needs a directory}; shift 2 ;;
    --unit-dir) unit_dir=${2:?--unit-dir needs a directory}; shift 2 ;;
    --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
    --no-build) build=0; shift ;;
    --enable) enable=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$prefix" in /*) ;; *) echo "install.sh: --prefix $prefix: must be an absolute path" >&2; exit 2 ;; esac
case "$unit_dir" in /*) ;; *) echo "install.sh: --unit-dir $unit_dir: must be an absolute path" >&2; exit 2 ;; esac
if ((enable)) && [ -n "$destdir" ]; then
  echo "install.sh: --enable with --destdir $destdir: staged units cannot be enabled" >&2
  exit 2
fi

# warren-supervise: the linux backend's per-sandbox supervisor, found beside warren (without
# it the server runs `warren __supervise`, which starts slower); built static.
bins=(warren warren-supervise containerd-shim-warren-v1 resource-slot-sandboxer)
units=(warren.service warren-sandboxer.service kuasar-resource-slot.service)
bin_dir=${bin_dir:-${CARGO_TARGET_DIR:-target}/release}

if ((build)); then
  cargo build --release --locked -p warren-cli -p warren-shim -p warren-sandboxer
  scripts/build-supervisor.sh "$bin_dir"
fi
for b in "${bins[@]}"; do
  [ -x "$bin_dir/$b" ] || { echo "install.sh: $bin_dir/$b: no such executable (build first, or give --bin-dir)" >&2; exit 1; }
done

for b in "${bins[@]}"; do
  install -D -m 0755 "$bin_dir/$b" "$destdir$prefix/bin/$b"
  echo "installed $destdir$prefix/bin/$b"
done
for u in "${units[@]}"; do
  install -d -m 0755 "$destdir$unit_dir"
  sed "s|@BINDIR@|$prefix/bin|g" "packaging/systemd/$u" > "$destdir$unit_dir/$u.tmp"
  chmod 0644 "$destdir$unit_dir/$u.tmp"
  mv "$destdir$unit_dir/$u.tmp" "$destdir$unit_dir/$u"
  echo "installed $destdir$unit_dir/$u"
done

if ((enable)); then
  systemctl daemon-reload
  systemctl enable "${units[@]}"
else
  echo "not enabled; to run them: systemctl daemon-reload && systemctl enable --now warren warren-sandboxer"
fi
