#!/usr/bin/env bash
# Builds the images of real lab nodes, here, from source: nothing is pulled
# from a registry (there is none to reach). Each image is cached by a key
# over everything it is made of, so a second run rebuilds nothing:
#
#   debian:bookworm-slim     debootstrap --variant=minbase of the mirror apt uses
#   golang:1.26-bookworm     that base plus this machine's Go toolchain and proxy settings
#   ghcr.io/sluice-net/sluice:<tag of manifests/sluice.yaml>
#                            `buildah bud` of the repository's Dockerfile
#   registry.k8s.io/pause:3.10.2
#                            pause.c of k8s.io/kubernetes, static
#   registry.k8s.io/e2e-test-images/agnhost:2.63.0 (and :2.45)
#                            agnhost of k8s.io/kubernetes, with sh, bash, curl and nc
#   registry.k8s.io/kube-proxy:v1.36.3
#                            kube-proxy of k8s.io/kubernetes with Debian's iptables
#                            (iptables-nft, as Debian selects it), nftables and conntrack
#   registry.k8s.io/kube-proxy:v1.36.3-iptables-legacy
#                            the same, with iptables-legacy selected
#   registry.k8s.io/coredns/coredns:v1.15.0
#                            CoreDNS (test/tools/coredns) on the Debian base
#
# Images live in a private buildah store under $SLUICE_TOOLS_DIR/images and
# are exported as docker archives, listed with their image IDs (the digest
# of the image config, which containerd reports) in
# $SLUICE_TOOLS_DIR/images/images.list: "REF ARCHIVE ID" per line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
out="${SLUICE_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice/tools}"
img="$out/images"
mkdir -p "$img/archives"
# vfs: no overlay mounts in the host's mount namespace that a crash could leave.
B=(buildah --root "$img/storage" --runroot "$img/run" --storage-driver vfs)

k8s_version="$(cd "$here/k8s" && go list -m -f '{{.Version}}' k8s.io/kubernetes)"
k8s_dir="$(cd "$here/k8s" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)"

sha() { sha256sum | cut -c1-16; }

# label REF: the cache key recorded on an image, or nothing.
label() { "${B[@]}" inspect --type image --format '{{index .ImageAnnotations "io.sluice.key"}}' "$1" 2>/dev/null || true; }

# export REF NAME KEY [ALIAS...]: writes the docker archive and the image's line in the list.
export_image() {
	local ref="$1" name="$2" key="$3"
	local archive="$img/archives/$name-$key.tar"
	if [ ! -s "$archive" ]; then
		rm -f "$archive.partial"
		"${B[@]}" push --quiet "$ref" "docker-archive:$archive.partial:$ref" >/dev/null
		mv "$archive.partial" "$archive"
		# Older archives of this image are no longer used.
		find "$img/archives" -name "$name-*.tar" ! -name "$name-$key.tar" -delete
	fi
	# The config's digest: docker archives name the config file by it.
	local id
	id="sha256:$(tar -xOf "$archive" manifest.json | grep -o '"Config":"[^"]*"' | grep -o '[0-9a-f]\{64\}')"
	printf '%s %s %s\n' "$ref" "$archive" "$id" >>"$img/images.list.partial"
	shift 3
	for alias in "$@"; do printf '%s %s %s\n' "$alias" "$archive" "$id" >>"$img/images.list.partial"; done
}

# commit_annotated CONTAINER REF KEY
commit() {
	"${B[@]}" config --annotation "io.sluice.key=$3" "$1"
	"${B[@]}" commit --quiet --rm "$1" "$2" >/dev/null
}

rm -f "$img/images.list.partial"
start=$SECONDS

# --- debian:bookworm-slim -------------------------------------------------
mirror="$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)"
[ -n "$mirror" ] || mirror="$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)"
[ -n "$mirror" ] || mirror="http://deb.debian.org/debian"
base_ref=docker.io/library/debian:bookworm-slim
base_key="$(printf 'bookworm minbase %s %s' "$mirror" "$(dpkg-query -W -f '${Version}' debootstrap)" | sha)"
if [ "$(label "$base_ref")" != "$base_key" ]; then
	echo "images: debootstrap bookworm from $mirror (about 40 s)"
	root="$img/rootfs.partial"
	rm -rf "$root"
	debootstrap --variant=minbase bookworm "$root" "$mirror" >"$img/debootstrap.log" 2>&1 ||
		{ tail -20 "$img/debootstrap.log"; exit 1; }
	rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
	c="$("${B[@]}" from scratch)"
	tar -C "$root" -cf - . | tar -C "$("${B[@]}" mount "$c")" -xf -
	"${B[@]}" umount "$c" >/dev/null
	"${B[@]}" config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$c"
	commit "$c" "$base_ref" "$base_key"
	rm -rf "$root"
else
	echo "images: $base_ref is cached"
fi

# --- golang:1.26-bookworm -------------------------------------------------
goroot="$(go env GOROOT)"
golang_ref=docker.io/library/golang:1.26-bookworm
# The machine's CA bundle comes along: the module proxy is reached through
# whatever TLS setup the machine has.
cabundle=/etc/ssl/certs/ca-certificates.crt
golang_key="$(printf '%s %s %s %s %s %s' "$base_key" "$(go version)" "$(go env GOPROXY)" "$(go env GOSUMDB)" "$(go env GOFLAGS)" "$(sha256sum <"$cabundle")" | sha)"
if [ "$(label "$golang_ref")" != "$golang_key" ]; then
	echo "images: building $golang_ref from $goroot"
	c="$("${B[@]}" from --pull-never "$base_ref")"
	"${B[@]}" copy "$c" "$goroot" /usr/local/go >/dev/null
	"${B[@]}" copy "$c" "$cabundle" /etc/ssl/certs/ca-certificates.crt >/dev/null
	"${B[@]}" config --workingdir /go \
		--env GOPATH=/go --env PATH=/go/bin:/usr/local/go/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
		--env "GOPROXY=$(go env GOPROXY)" --env "GOSUMDB=$(go env GOSUMDB)" --env "GOFLAGS=$(go env GOFLAGS)" \
		--env GOTOOLCHAIN=local "$c"
	commit "$c" "$golang_ref" "$golang_key"
else
	echo "images: $golang_ref is cached"
fi

# --- ghcr.io/sluice-net/sluice --------------------------------------------
tag="$(awk '$1 == "image:" && $2 ~ /^ghcr.io\/sluice-net\/sluice:/ {sub(/.*:/, "", $2); print $2; exit}' "$repo/manifests/sluice.yaml")"
sluice_ref="ghcr.io/sluice-net/sluice:$tag"
# The build context is the repository as .dockerignore leaves it.
context_files() {
	if git -C "$repo" rev-parse >/dev/null 2>&1; then
		git -C "$repo" ls-files -co --exclude-standard -z
	else
		(cd "$repo" && find . -type f ! -path './.git/*' -printf '%P\0')
	fi
}
context_key="$(cd "$repo" && context_files | grep -zv -e '^bin/' -e '^bench/' | sort -z |
	xargs -0 sha256sum 2>/dev/null | sha)"
sluice_key="$(printf '%s %s %s' "$base_key" "$golang_key" "$context_key" | sha)"
if [ "$(label "$sluice_ref")" != "$sluice_key" ]; then
	echo "images: buildah bud of $repo/Dockerfile as $sluice_ref"
	# The machine's module and build caches serve the build steps, like
	# BuildKit's cache mounts; the image does not keep them.
	mkdir -p "$(go env GOMODCACHE)" "$(go env GOCACHE)"
	"${B[@]}" bud --quiet --pull-never --isolation chroot --network host --layers=false \
		--volume "$(go env GOMODCACHE):/go/pkg/mod" --volume "$(go env GOCACHE):/root/.cache/go-build" \
		--annotation "io.sluice.key=$sluice_key" \
		-f "$repo/Dockerfile" -t "$sluice_ref" "$repo" >"$img/sluice-build.log" 2>&1 ||
		{ tail -30 "$img/sluice-build.log"; exit 1; }
else
	echo "images: $sluice_ref is cached"
fi

# --- registry.k8s.io/pause ------------------------------------------------
pause_ref=registry.k8s.io/pause:3.10.2
pause_key="$(printf '%s %s' "$(sha256sum <"$k8s_dir/build/pause/linux/pause.c")" "$(gcc --version | head -1)" | sha)"
if [ "$(label "$pause_ref")" != "$pause_key" ]; then
	echo "images: building $pause_ref from $k8s_dir/build/pause/linux/pause.c"
	gcc -Os -Wall -Werror -static -DVERSION=v3.10.2-$k8s_version -o "$img/pause" "$k8s_dir/build/pause/linux/pause.c"
	c="$("${B[@]}" from scratch)"
	"${B[@]}" copy --chmod 0755 "$c" "$img/pause" /pause >/dev/null
	"${B[@]}" config --entrypoint '["/pause"]' --user 65535:65535 "$c"
	commit "$c" "$pause_ref" "$pause_key"
	rm -f "$img/pause"
else
	echo "images: $pause_ref is cached"
fi

# --- agnhost ----------------------------------------------------------------
agnhost_bin="$out/agnhost-$k8s_version/agnhost"
if [ ! -x "$agnhost_bin" ]; then
	echo "images: building agnhost $k8s_version"
	mkdir -p "$out/agnhost-$k8s_version.partial"
	(cd "$here/k8s" && CGO_ENABLED=0 go build -trimpath -o "$out/agnhost-$k8s_version.partial/agnhost" k8s.io/kubernetes/test/images/agnhost)
	rm -rf "$out/agnhost-$k8s_version" && mv "$out/agnhost-$k8s_version.partial" "$out/agnhost-$k8s_version"
fi
agnhost_ref=registry.k8s.io/e2e-test-images/agnhost:2.63.0
# The key names the default command: images built before it had none.
agnhost_key="$(printf '%s %s %s' "$base_key" "$(sha256sum <"$agnhost_bin")" "cmd=pause" | sha)"
if [ "$(label "$agnhost_ref")" != "$agnhost_key" ]; then
	echo "images: building $agnhost_ref"
	ctx="$img/agnhost-context"
	rm -rf "$ctx" && mkdir -p "$ctx"
	cp "$agnhost_bin" "$ctx/agnhost"
	# Like the real image, it has a shell, bash, curl and nc: the public
	# suites run shell commands in it. And like it, a container with no
	# command pauses (the network-policy-api conformance suite's client
	# containers have none); without it agnhost prints its usage and exits.
	cat >"$ctx/Containerfile" <<-'EOF'
		FROM debian:bookworm-slim
		RUN apt-get update && apt-get install -y --no-install-recommends bash curl netcat-openbsd iproute2 ca-certificates && rm -rf /var/lib/apt/lists/*
		COPY agnhost /agnhost
		ENTRYPOINT ["/agnhost"]
		CMD ["pause"]
	EOF
	"${B[@]}" bud --quiet --pull-never --isolation chroot --network host --layers=false \
		--annotation "io.sluice.key=$agnhost_key" -f "$ctx/Containerfile" -t "$agnhost_ref" "$ctx" >"$img/agnhost-build.log" 2>&1 ||
		{ tail -30 "$img/agnhost-build.log"; exit 1; }
	rm -rf "$ctx"
else
	echo "images: $agnhost_ref is cached"
fi

# --- kube-proxy ------------------------------------------------------------
# One image per iptables backend: kube-proxy writes its rules with whatever
# iptables the image selects, and Sluice must follow it (KUBE-IPTABLES-HINT).
kube_proxy_bin="$out/k8s-node-$k8s_version/kube-proxy"
kube_proxy_ref=registry.k8s.io/kube-proxy:$k8s_version
kube_proxy_legacy_ref=registry.k8s.io/kube-proxy:$k8s_version-iptables-legacy
for variant in nft legacy; do
	ref="$kube_proxy_ref"
	[ "$variant" = nft ] || ref="$kube_proxy_legacy_ref"
	key="$(printf '%s %s %s' "$base_key" "$(sha256sum <"$kube_proxy_bin")" "$variant" | sha)"
	eval "kube_proxy_${variant}_key=$key"
	if [ "$(label "$ref")" = "$key" ]; then
		echo "images: $ref is cached"
		continue
	fi
	echo "images: building $ref"
	ctx="$img/kube-proxy-context"
	rm -rf "$ctx" && mkdir -p "$ctx"
	cp "$kube_proxy_bin" "$ctx/kube-proxy"
	select=true
	[ "$variant" = nft ] || select="update-alternatives --set iptables /usr/sbin/iptables-legacy \&\& update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy"
	sed "s|@SELECT@|$select|" >"$ctx/Containerfile" <<-'EOF'
		FROM debian:bookworm-slim
		RUN apt-get update && apt-get install -y --no-install-recommends iptables nftables conntrack ipset kmod && rm -rf /var/lib/apt/lists/* && @SELECT@
		COPY kube-proxy /usr/local/bin/kube-proxy
		ENTRYPOINT ["/usr/local/bin/kube-proxy"]
	EOF
	"${B[@]}" bud --quiet --pull-never --isolation chroot --network host --layers=false \
		--annotation "io.sluice.key=$key" -f "$ctx/Containerfile" -t "$ref" "$ctx" >"$img/kube-proxy-build.log" 2>&1 ||
		{ tail -30 "$img/kube-proxy-build.log"; exit 1; }
	rm -rf "$ctx"
done

# --- CoreDNS ----------------------------------------------------------------
coredns_version="$(cd "$here/coredns" && go list -m -f '{{.Version}}' github.com/coredns/coredns)"
coredns_bin="$out/coredns-$coredns_version/coredns"
coredns_ref=registry.k8s.io/coredns/coredns:$coredns_version
coredns_key="$(printf '%s %s entrypoint-only' "$base_key" "$(sha256sum <"$coredns_bin")" | sha)"
if [ "$(label "$coredns_ref")" != "$coredns_key" ]; then
	echo "images: building $coredns_ref"
	c="$("${B[@]}" from --pull-never "$base_ref")"
	"${B[@]}" copy --chmod 0755 "$c" "$coredns_bin" /coredns >/dev/null
	"${B[@]}" config --entrypoint '["/coredns"]' --cmd '' --port 53/udp --port 53/tcp "$c"
	commit "$c" "$coredns_ref" "$coredns_key"
else
	echo "images: $coredns_ref is cached"
fi

export_image "$sluice_ref" sluice "$sluice_key"
export_image "$kube_proxy_ref" kube-proxy "$kube_proxy_nft_key"
export_image "$kube_proxy_legacy_ref" kube-proxy-legacy "$kube_proxy_legacy_key"
export_image "$coredns_ref" coredns "$coredns_key"
export_image "$pause_ref" pause "$pause_key"
# 2.45 is the tag the network-policy-api conformance suite uses.
export_image "$agnhost_ref" agnhost "$agnhost_key" registry.k8s.io/e2e-test-images/agnhost:2.45
mv "$img/images.list.partial" "$img/images.list"
# Images a rebuild replaced keep their layers until pruned.
"${B[@]}" rmi --prune >/dev/null 2>&1 || true
echo "images: ready in $((SECONDS - start)) s; list in $img/images.list"
