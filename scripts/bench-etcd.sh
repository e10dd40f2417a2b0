#!/usr/bin/env bash
# Creates through the API on the etcd store beside the embedded store, in one run:
#   scripts/bench-etcd.sh [N] [C]       (default 2000 creates at concurrency 32, then 500 at 1)
# Starts a private etcd (loopback ports, temp data dir on the same disk) and two servers,
# runs `warren bench create` in strong and fast mode against each, and removes everything
# on exit. Needs target/release/warren (cargo build --release -p warren-cli) and etcd
# (scripts/install-etcd.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
W=${WARREN:-target/release/warren}
N=${1:-2000}
C=${2:-32}
T=$(mktemp -d /var/tmp/warren-bench-etcd.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cp=$(free_port); pp=$(free_port)
etcd --name bench --data-dir "$T/etcd" \
  --listen-client-urls "http://127.0.0.1:$cp" --advertise-client-urls "http://127.0.0.1:$cp" \
  --listen-peer-urls "http://127.0.0.1:$pp" --initial-advertise-peer-urls "http://127.0.0.1:$pp" \
  --initial-cluster "bench=http://127.0.0.1:$pp" >"$T/etcd.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$cp/health" >/dev/null 2>&1 && break
  sleep 0.1
done

start_server() { # NAME EXTRA...
  local name=$1; shift
  "$W" server --dir "$T/$name" --listen "unix://$T/$name.sock" --metrics-listen off \
    --log-level warn "$@" >"$T/$name.out" 2>"$T/$name.log" &
  pids+=($!)
  for _ in $(seq 100); do
    "$W" -s "unix://$T/$name.sock" info >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "server $name did not start:" >&2; cat "$T/$name.log" >&2; exit 1
}
start_server redb
start_server etcd --store "etcd://127.0.0.1:$cp"

for mode in strong fast; do
  for store in redb etcd; do
    echo "== $store, --mode $mode, n=$N c=$C"
    "$W" -s "unix://$T/$store.sock" bench create -n "$N" -c "$C" --mode "$mode"
    echo "== $store, --mode $mode, n=500 c=1"
    "$W" -s "unix://$T/$store.sock" bench create -n 500 -c 1 --mode "$mode"
  done
done
