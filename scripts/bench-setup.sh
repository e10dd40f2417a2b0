#!/usr/bin/env bash
# Installs the peers the benchmarks compare warren with. Slow (the wasmtime CLI builds from
# source for ~13 minutes), so never part of CI.
set -euo pipefail
if ! command -v wasmtime >/dev/null; then
  # 48.0.8 is the newest wasmtime that builds with Rust 1.95; a plain install picks a newer one.
  cargo install wasmtime-cli@48.0.8 --locked
fi
wasmtime --version
