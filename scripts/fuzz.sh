#!/usr/bin/env bash
# Builds every fuzz target with coverage instrumentation on stable Rust and runs each for
# SECONDS (default 60). cargo-fuzz on nightly works too: `cd fuzz && cargo fuzz run quantity`.
#   scripts/fuzz.sh [SECONDS]    0 builds the targets without running them
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"
cargo build --release --locked --target x86_64-unknown-linux-gnu -q
bin=target/x86_64-unknown-linux-gnu/release
for target in quantity annotations spec_json log_line guest_hello; do
  [ -x "$bin/$target" ] || { echo "fuzz: $target did not build" >&2; exit 1; }
  if [ "$seconds" -gt 0 ]; then
    corpus=$(mktemp -d)
    trap 'rm -rf "$corpus"' EXIT
    "$bin/$target" -max_total_time="$seconds" -print_final_stats=0 "$corpus" 2>&1 | tail -n 1
    rm -rf "$corpus"
    trap - EXIT
  fi
  echo "fuzz: $target ok"
done
