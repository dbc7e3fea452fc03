#!/usr/bin/env bash
# Builds the lab's tools from the Go module proxy into a cache keyed by
# version, so a second run costs nothing:
#   $SLUICE_TOOLS_DIR/k8s-v1.36.3/{etcd,kube-apiserver,kube-controller-manager,kube-scheduler,kubectl}
#   $SLUICE_TOOLS_DIR/cni-v1.10.0/{ptp,bridge,host-local,loopback,portmap,bandwidth}
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${SLUICE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/tools}"

k8s_version="$(cd "$here/k8s" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
cni_version="$(cd "$here/cni" && go list -m -f '{{.Version}}' github.com/containernetworking/plugins)"

build() { # dir name pkgs...
	local mod="$1" dest="$2"; shift 2
	local missing=0
	for p in "$@"; do [ -x "$dest/$(basename "$p")" ] || missing=1; done
	if [ "$missing" = 0 ]; then echo "tools: $dest is cached"; return; fi
	echo "tools: building $dest (the Kubernetes set takes about 5 minutes on 2 cores)"
	mkdir -p "$dest.partial"
	(cd "$here/$mod" && CGO_ENABLED=0 go build -trimpath -o "$dest.partial/" "$@")
	rm -rf "$dest" && mv "$dest.partial" "$dest"
}

build k8s "$out/k8s-$k8s_version" ./etcd \
	k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
build cni "$out/cni-$cni_version" \
	github.com/containernetworking/plugins/plugins/main/ptp \
	github.com/containernetworking/plugins/plugins/main/bridge \
	github.com/containernetworking/plugins/plugins/ipam/host-local \
	github.com/containernetworking/plugins/plugins/main/loopback \
	github.com/containernetworking/plugins/plugins/meta/portmap \
	github.com/containernetworking/plugins/plugins/meta/bandwidth

# flanneld, for the flannel-and-Sluice-in-one-cluster test. Its udp backend
# needs cgo.
flannel_version="$(cd "$here/flannel" && go list -m -f '{{.Version}}' github.com/flannel-io/flannel)"
dest="$out/flannel-$flannel_version"
if [ -x "$dest/flanneld" ]; then
	echo "tools: $dest is cached"
else
	echo "tools: building $dest"
	mkdir -p "$dest.partial"
	(cd "$here/flannel" && CGO_ENABLED=1 go build -trimpath -o "$dest.partial/flanneld" github.com/flannel-io/flannel)
	rm -rf "$dest" && mv "$dest.partial" "$dest"
fi
