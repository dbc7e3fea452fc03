#!/usr/bin/env bash
# Builds the lab's tools from the Go module proxy into a cache keyed by
# version, so a second run costs nothing:
#   $SLUICE_TOOLS_DIR/k8s-v1.36.3/{etcd,kube-apiserver,kube-controller-manager,kube-scheduler,kubectl}
#   $SLUICE_TOOLS_DIR/k8s-node-v1.36.3/{kubelet,kube-proxy} (real lab nodes, --runtime containerd)
#   $SLUICE_TOOLS_DIR/crictl-v1.37.0/crictl (the real-node tests drive sandboxes with it)
#   $SLUICE_TOOLS_DIR/cni-v1.10.0/{ptp,bridge,host-local,loopback,portmap,bandwidth}
#   $SLUICE_TOOLS_DIR/coredns-v1.15.0/coredns (the lab's cluster DNS, about 1 minute)
#   $SLUICE_TOOLS_DIR/cnp-conformance-v0.3.0/conformance.test (network-policy-api's conformance suite)
# The images of real nodes are test/tools/images.sh's.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${SLUICE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/tools}"

k8s_version="$(cd "$here/k8s" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
cni_version="$(cd "$here/cni" && go list -m -f '{{.Version}}' github.com/containernetworking/plugins)"
cri_version="$(cd "$here/cri" && go list -m -f '{{.Version}}' sigs.k8s.io/cri-tools)"
coredns_version="$(cd "$here/coredns" && go list -m -f '{{.Version}}' github.com/coredns/coredns)"

build() { # dir name pkgs...
	local mod="$1" dest="$2"; shift 2
	local missing=0
	for p in "$@"; do [ -x "$dest/$(basename "$p")" ] || missing=1; done
	if [ "$missing" = 0 ]; then echo "tools: $dest is cached"; return; fi
	echo "tools: building $dest (the Kubernetes set takes about 5 minutes on 2 cores)"
	mkdir -p "$dest.partial"
	(cd "$here/$mod" && CGO_ENABLED=0 go build -trimpath ${LDFLAGS:+-ldflags "$LDFLAGS"} -o "$dest.partial/" "$@")
	rm -rf "$dest" && mv "$dest.partial" "$dest"
}

build k8s "$out/k8s-$k8s_version" ./etcd \
	k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
	k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
# The node components of real lab nodes (--runtime containerd), in their
# own directory: they came later, and the control plane's cache stays valid
# without them. They carry their version, which the kubelet reports in its
# Node's status.
k8s_minor="${k8s_version#v1.}"
LDFLAGS="-X k8s.io/component-base/version.gitVersion=$k8s_version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=${k8s_minor%%.*}" \
	build k8s "$out/k8s-node-$k8s_version" k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
build cri "$out/crictl-$cri_version" sigs.k8s.io/cri-tools/cmd/crictl
# CoreDNS with the plugins a cluster's DNS uses (see coredns/main.go).
build coredns "$out/coredns-$coredns_version" github.com/sluice-net/sluice/test/tools/coredns
build cni "$out/cni-$cni_version" \
	github.com/containernetworking/plugins/plugins/main/ptp \
	github.com/containernetworking/plugins/plugins/main/bridge \
	github.com/containernetworking/plugins/plugins/ipam/host-local \
	github.com/containernetworking/plugins/plugins/main/loopback \
	github.com/containernetworking/plugins/plugins/meta/portmap \
	github.com/containernetworking/plugins/plugins/meta/bandwidth

# The public ClusterNetworkPolicy conformance suite of
# sigs.k8s.io/network-policy-api, a test binary (test/cnpe2e runs it against
# a real-node lab); about 90 s.
cnp_version="$(cd "$here/cnpconformance" && go list -m -f '{{.Version}}' sigs.k8s.io/network-policy-api)"
dest="$out/cnp-conformance-$cnp_version"
if [ -x "$dest/conformance.test" ]; then
	echo "tools: $dest is cached"
else
	echo "tools: building $dest"
	mkdir -p "$dest.partial"
	(cd "$here/cnpconformance" && CGO_ENABLED=0 go test -c -trimpath -o "$dest.partial/conformance.test" sigs.k8s.io/network-policy-api/conformance)
	rm -rf "$dest" && mv "$dest.partial" "$dest"
fi

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
