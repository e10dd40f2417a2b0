#!/usr/bin/env bash
# Builds `warren-supervise` as a static, non-PIE executable and puts it beside `warren`.
#
#   scripts/build-supervisor.sh [BIN_DIR]        release; BIN_DIR: ${CARGO_TARGET_DIR:-target}/release
#   scripts/build-supervisor.sh --dev [BIN_DIR]  the dev profile (what scripts/test.sh checks)
#
# BIN_DIR holds the `warren` it is for; `-` builds without installing it anywhere (the path is
# printed last).
#
# The linux backend starts one supervisor per sandbox (and per `warren exec`), so its start is
# on every create's path. Linked the usual way (dynamic, position-independent) it spends its
# first ~0.3-0.6 ms in the dynamic loader: loading libc and libgcc_s and applying ~14,000
# relocations. Static and non-PIE, it has neither (measured in docs/PERFORMANCE.md).
#
# cargo cannot give one binary of a workspace other link flags than the rest (and
# `+crt-static` on every host artifact would break proc-macros), so this is a build of its
# own: `--target` keeps RUSTFLAGS off build scripts and proc-macros, and its own target
# directory keeps the workspace's build untouched. The server uses it only when its
# `--build-id` matches the server's (same sources), as with any `warren-supervise`.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
if [ "${1:-}" = --dev ]; then
  profile=dev
  shift
fi
dir=$([ $profile = dev ] && echo debug || echo release)
bin_dir=${1:-${CARGO_TARGET_DIR:-target}/$dir}
if [ "$bin_dir" != - ] && [ ! -x "$bin_dir/warren" ]; then
  echo "build-supervisor: $bin_dir/warren: no such executable (cargo build --profile $profile -p warren-cli first)" >&2
  exit 1
fi
host=$(rustc -vV | sed -n 's/^host: //p')
case "$host" in
  *-linux-gnu) ;;
  *) echo "build-supervisor: host $host: only *-linux-gnu targets are built static here" >&2; exit 1 ;;
esac
out=$(realpath -m "${CARGO_TARGET_DIR:-target}")/supervisor
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --profile $profile --locked -q -p warren-linux --bin warren-supervise \
  --target "$host" --target-dir "$out"
built=$out/$host/$dir/warren-supervise
if [ "$bin_dir" = - ]; then
  echo "$built"
  exit 0
fi
want=$("$bin_dir/warren" __supervise --build-id)
got=$("$built" --build-id)
if [ "$want" != "$got" ]; then
  echo "build-supervisor: $bin_dir/warren is from other sources (build id $want, the supervisor's $got): rebuild it" >&2
  exit 1
fi
# A new inode: cargo's hard link in $bin_dir/deps keeps its own binary.
install -m 0755 "$built" "$bin_dir/warren-supervise.tmp"
mv -f "$bin_dir/warren-supervise.tmp" "$bin_dir/warren-supervise"
echo "build-supervisor: $bin_dir/warren-supervise (static, build id $got)"
