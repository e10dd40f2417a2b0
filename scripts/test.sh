#!/usr/bin/env bash
# The whole gate: what CI runs (via .ci/run) and what a developer runs before a commit.
#   scripts/test.sh          everything
#   FUZZ_SECONDS=0 scripts/test.sh   skip the short fuzz run
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# CI builds from a clean clone: incremental state would only double target/ (~3 GB more on
# a disk that a full debug build already fills by ~10 GB) and slow the one build it has.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# A full disk shows up 20 minutes later as a bare "linking with cc failed": say it first.
free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
if [ "${free_kb:-0}" -lt $((12 * 1024 * 1024)) ]; then
  echo "warning: $((free_kb / 1024 / 1024)) GB free under $(pwd); a clean build and test run needs about 12 GB" >&2
fi

echo "== format"
cargo fmt --all --check

echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== static supervisor"
# What installs ship (scripts/install.sh): checked by bench_linux's the_static_supervisor_runs_sandboxes.
WARREN_STATIC_SUPERVISOR=$(scripts/build-supervisor.sh --dev - | tail -n 1)
export WARREN_STATIC_SUPERVISOR

echo "== tests"
# --no-fail-fast: one run reports every failing binary, not only the first.
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee target/test-output.txt || status=$?
# One closing line for the whole run, summed over every test binary (failed or not).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "tests: %d passed, %d failed, %d skipped\n", p, f, i }' \
  target/test-output.txt
[ "$status" -eq 0 ] || exit "$status"

echo "== fuzz (${FUZZ_SECONDS:-10}s per target)"
scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
