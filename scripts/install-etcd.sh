#!/usr/bin/env bash
# Installs what warren's etcd store and its tests need, idempotently (called by install-deps.sh):
# - etcd-server: the tests start their own etcd on free loopback ports in a temp dir;
# - etcd-client: etcdctl, to look at warren's keys by hand (docs/cluster.md);
# - protobuf-compiler: etcd-client's build script compiles etcd's protos with a system protoc.
# The package's own etcd service is not wanted: if the package started one, it is stopped and
# disabled so that nothing listens on 2379 behind the tests' back.
set -euo pipefail

need_apt=()
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)

if ((${#need_apt[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-etcd: need root to apt-get install ${need_apt[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
  if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
  fi
fi
echo "install-etcd: $(etcd --version 2>/dev/null | head -1)"
