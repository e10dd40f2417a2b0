#!/usr/bin/env bash
# warren's main job on the embedded default, end to end: start a server on a temporary dir,
# run a slot sandbox with CRI resource annotations, show it and the resources.json it wrote,
# delete it, run a Wasm module to completion, run a busybox container (as root), stop the
# server. Leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p warren-cli -p warren-linux
warren=target/debug/warren

dir=$(mktemp -d -t warren-demo-XXXXXX)
export WARREN_SERVER="unix://$dir/warren.sock"
cgroup_parent="warren-demo-$$"
"$warren" server --dir "$dir/state" --cgroup-parent "$cgroup_parent" >"$dir/server.out" 2>"$dir/server.log" &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -rf "$dir"
  for h in /sys/fs/cgroup/*/ /sys/fs/cgroup/; do rmdir "$h$cgroup_parent" 2>/dev/null || true; done
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$dir/warren.sock" ] && break; sleep 0.05; done

set -x
"$warren" run --name demo \
  -a resources.limits.cpu=2 -a resources.requests.cpu=1 \
  -a resources.limits.memory=2Gi -a resources.requests.memory=1Gi \
  -a resources.limits.pid=1000 -l app=demo
"$warren" ls
cat "$dir"/state/slot/*/resources.json
"$warren" rm demo
"$warren" run -b wasm --module crates/wasm/tests/modules/hello.wat --name hello --wait
if [ "$(id -u)" -eq 0 ] && [ -x /bin/busybox ]; then
  "$warren" image import "$(cargo run -q -p warren-image --example busybox-layout -- "$dir/busybox")"
  "$warren" run -b linux -i busybox --name box -m 64Mi --pids 50 --wait -- \
    sh -c 'echo "hello from $(hostname), pid $$"; id'
  "$warren" rm box
fi
"$warren" ls
{ set +x; } 2>/dev/null
echo "server log (last lines):"
tail -n 3 "$dir/server.log"
