#!/usr/bin/env bash
# Installs what the linux backend's `network.mode: egress` needs, idempotently: Debian's
# nftables (`nft`, the allow-list), iproute2 (`ip`, the veth pairs; `tc`, bandwidth
# limits) and util-linux (`nsenter`, the sandbox's side). Fast when they are there. Called by install-deps.sh.
set -euo pipefail

need=()
command -v nft >/dev/null || [ -x /usr/sbin/nft ] || need+=(nftables)
command -v ip >/dev/null || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need+=(iproute2)
command -v tc >/dev/null || [ -x /usr/sbin/tc ] || [ -x /sbin/tc ] || need+=(iproute2)
command -v nsenter >/dev/null || need+=(util-linux)

if ((${#need[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-egress: need root to apt-get install ${need[*]}" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
echo "install-egress: ok"
