# The image of the sluice DaemonSet: sluiced, the sluice CNI plugin and the
# reference plugins it installs next to itself, with iptables and ipset.
FROM golang:1.26-bookworm AS build
# The version the agents report (sluicectl status); the manifest's image tag.
ARG SLUICE_VERSION=v0.1.0
WORKDIR /src
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-X main.version=${SLUICE_VERSION}" -o /out/ ./cmd/... && \
    cd test/tools/cni && CGO_ENABLED=0 go build -trimpath -o /out/ \
      github.com/containernetworking/plugins/plugins/ipam/host-local \
      github.com/containernetworking/plugins/plugins/main/loopback \
      github.com/containernetworking/plugins/plugins/meta/portmap \
      github.com/containernetworking/plugins/plugins/meta/bandwidth

FROM debian:bookworm-slim
RUN apt-get update && \
    apt-get install -y --no-install-recommends iptables ipset conntrack iproute2 ethtool && \
    rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /opt/sluice/bin/
ENTRYPOINT ["/opt/sluice/bin/sluiced"]
