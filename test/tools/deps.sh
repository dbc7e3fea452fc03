#!/usr/bin/env bash
# Installs the Debian packages the lab and the tests use, when a command of
# theirs is missing. One list for `make lab`, `make test` and CI.
set -euo pipefail

# command -> package
declare -A need=(
	[ip]=iproute2 [iptables-nft]=iptables [ipset]=ipset [conntrack]=conntrack
	[iperf3]=iperf3 [ethtool]=ethtool [ping]=iputils-ping [nc]=netcat-openbsd
	[nsenter]=util-linux [pkill]=procps [gcc]=gcc [make]=make [curl]=curl
	# Real lab nodes: the runtime, and the tools that build their images.
	[containerd]=containerd [runc]=runc [debootstrap]=debootstrap [buildah]=buildah
	[tar]=tar [sha256sum]=coreutils
	# The Services tests read kube-proxy's nftables mode back.
	[nft]=nftables
)
missing=()
for cmd in "${!need[@]}"; do
	command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
# pause is linked statically (test/tools/images.sh).
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e /usr/lib/libc.a ] || missing+=(libc6-dev)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
	echo "missing packages: ${missing[*]}; install them (as root: apt-get install ${missing[*]})" >&2
	exit 1
fi
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# containerd's package would start a host-wide containerd where an init
# system runs; the lab starts its own per node, so keep services from
# starting while installing (Debian's policy-rc.d convention).
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
	printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
	trap 'rm -f "$policy"' EXIT
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
