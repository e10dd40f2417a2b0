#!/usr/bin/env bash
# The exec gate's cost (docs/PERFORMANCE.md "exec allow-list on linux"): a busybox shell in a
# linux sandbox runs /bin/true N times in a loop; the same sandbox without a policy, under a
# policy with only a syscall list (no gate: the filter it had before), and under one with an
# exec list (every exec waits for the supervisor's answer). Each timing is a whole
# `warren run --wait` minus the same run with an empty loop, so create and exit cancel out.
# Prints per-exec medians over R rounds. Root; run after `cargo build --release -p
# warren-cli -p warren-linux` (W= picks another binary).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-target/release/warren}
N=${N:-1000}
R=${R:-7}

dir=$(mktemp -d /tmp/warren-execgate.XXXXXX)
S="unix://$dir/w.sock"
server=
cleanup() {
  [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$dir"
  # The sandboxes have ended (their supervisors removed their cgroups): the parent is empty.
  find /sys/fs/cgroup -maxdepth 3 -type d -name warren-bench-execgate -exec rmdir {} + 2>/dev/null || true
}
trap cleanup EXIT

"$W" server --dir "$dir/state" --listen "$S" --metrics-listen off --cgroup-parent warren-bench-execgate \
  >"$dir/server.log" 2>&1 &
server=$!
for _ in $(seq 100); do [ -S "$dir/w.sock" ] && break; sleep 0.05; done
cargo run -q --release -p warren-image --example busybox-layout -- "$dir/bb" >/dev/null
"$W" -s "$S" image import "$dir/bb" >/dev/null
policy() {
  printf 'apiVersion: warren.dev/v1\nkind: Policy\nmetadata:\n  name: %s\nspec:\n%s\n' "$1" "$2" \
    >"$dir/$1.yaml"
  "$W" -s "$S" policy apply -f "$dir/$1.yaml" >/dev/null
}
policy syscalls '  syscalls:
    deny: [chroot]'
policy gated '  exec:
    allow: ["/bin/*"]'

# One `warren run --wait` of a loop of $1 execs, under policy $2 (or none): microseconds.
# The sandbox is kept (its supervisor's log reports the gate's own time) and removed later.
run_us() {
  local n=$1 pol=$2 flags=()
  [ "$pol" != none ] && flags=(--policy "$pol")
  local t0 t1
  t0=$(date +%s%N)
  # (a subshell runs this: the name comes from the clock, not a counter)
  "$W" -s "$S" run -b linux -i busybox --name "b$t0-$pol" --wait "${flags[@]}" \
    --entrypoint /bin/sh -- -c "i=0; while [ \$i -lt $n ]; do /bin/true; i=\$((i+1)); done" \
    >/dev/null
  t1=$(date +%s%N)
  echo $(((t1 - t0) / 1000))
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

modes=(none syscalls gated)
declare -A per
for pol in "${modes[@]}"; do run_us 0 "$pol" >/dev/null; done # warm-up
# Rounds interleave the modes, so a busy spell of the machine hits all three alike.
for _ in $(seq "$R"); do
  for pol in "${modes[@]}"; do
    empty=$(run_us 0 "$pol")
    full=$(run_us "$N" "$pol")
    per[$pol]+="$(((full - empty) * 1000 / N)) "
  done
done
echo "exec of /bin/true in a busybox shell, $N per run, $R rounds (ns per exec, median):"
for pol in "${modes[@]}"; do
  # shellcheck disable=SC2086
  printf '  %-9s %8s   (rounds: %s)\n' "$pol" "$(printf '%s\n' ${per[$pol]} | median)" "${per[$pol]}"
done
# The same loop on the host, outside any sandbox, for scale.
host=()
for _ in $(seq "$R"); do
  t0=$(date +%s%N)
  /bin/busybox sh -c "i=0; while [ \$i -lt $N ]; do /bin/busybox true; i=\$((i+1)); done"
  host+=($((($(date +%s%N) - t0) / N)))
done
printf '  %-9s %8s   (rounds: %s)\n' host "$(printf '%s\n' "${host[@]}" | median)" "${host[*]}"
echo "the gated supervisors' own time per decision (from their logs; runs of $N execs):"
grep -h "exec gate: .* execs allowed" "$dir"/state/linux/*/supervisor.log |
  sed 's/.*exec gate: \([0-9]*\) execs allowed.* took \([0-9.]*\) µs on average, \([0-9.]*\) µs at most/\1 \2 \3/' |
  awk -v n="$N" '$1 >= n {print $2, $3}' | sort -n |
  awk '{m[NR]=$1; x[NR]=$2} END {if (NR) printf "  mean per run, median of %d runs: %s us (slowest single decision in that run: %s us)\n", NR, m[int((NR+1)/2)], x[int((NR+1)/2)]}'
