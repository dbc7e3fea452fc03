# Sluice: one target per habit. Tests that need root or a control plane are
# part of `make test`; run it as root.
GO        ?= go
BIN       := bin
TOOLS_DIR ?= $(or $(SLUICE_TOOLS_DIR),$(HOME)/.cache/sluice/tools)
export SLUICE_TOOLS_DIR := $(TOOLS_DIR)
# One package at a time: the lab packages each run a cluster, and on 2 cores
# running them side by side starves their agents of CPU (repairs then miss
# their 10 s bound).
TEST_FLAGS ?= -count=1 -timeout 60m -p 1
BENCH_OUT ?= bench/report.txt

.PHONY: all build deps tools images test bench bench-scale lab lab-down lint clean generate

all: build

# Static binaries: the CNI plugin starts for every pod, and the dynamic
# loader alone would cost it about a millisecond.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo devel)
build:
	CGO_ENABLED=0 $(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN)/ ./cmd/...

# The Calico policy CRDs, generated from github.com/projectcalico/api's Go
# types (internal/crdgen) into manifests/sluice.yaml, and the
# crd.projectcalico.org/v1 set of a Canal cluster into
# manifests/canal-crds.yaml. A test fails while they are stale.
generate:
	$(GO) run ./internal/crdgen/gen

# The Debian packages the lab and the tests use (iproute2, iptables, ipset,
# conntrack, iperf3, ...), installed with apt-get when missing.
deps:
	test/tools/deps.sh

# The lab's control plane and the reference CNI plugins, built from the Go
# module proxy and cached by version in $(TOOLS_DIR).
tools:
	test/tools/build.sh

# The images of real lab nodes (--runtime containerd), built here with
# debootstrap and buildah: Debian bookworm, a Go builder, Sluice's image
# from the Dockerfile, pause and agnhost. Cached by content in
# $(TOOLS_DIR)/images; a second run rebuilds nothing.
images: tools
	test/tools/images.sh

# The core policy truth tables run again on real nodes: the real kubelet
# and containerd, the DaemonSet as containers of the Dockerfile's image,
# once over vxlan and once over userspace WireGuard inside those containers
# (test/realnodee2e and test/wgrealnodee2e have the rest of the real-node
# tests).
REAL_NODE_POLICY_TESTS := TestNoPolicyAllOpen|TestDefaultDenyIngressThenAllowFromNamespace|TestNamedPortAndEgress|TestIPBlockExceptEndPortAndTheOutsideHost

test: deps tools images
	$(GO) test $(TEST_FLAGS) ./...
	SLUICE_LAB_RUNTIME=containerd $(GO) test $(TEST_FLAGS) -run '$(REAL_NODE_POLICY_TESTS)' ./test/policye2e/
	SLUICE_LAB_RUNTIME=containerd SLUICE_LAB_BACKEND=wireguard $(GO) test $(TEST_FLAGS) -run '$(REAL_NODE_POLICY_TESTS)' ./test/policye2e/
	$(GO) test -run '^$$' -fuzz '^FuzzFromNetworkPolicy$$' -fuzztime 30s ./policy/
	$(GO) test -run '^$$' -fuzz '^FuzzFromCalicoPolicy$$' -fuzztime 30s ./policy/
	$(GO) test -run '^$$' -fuzz '^FuzzCalicoSelector$$' -fuzztime 30s ./policy/
	$(GO) test -run '^$$' -fuzz '^FuzzFromClusterNetworkPolicy$$' -fuzztime 30s ./policy/

bench: deps tools images
	@mkdir -p $(dir $(BENCH_OUT))
	$(GO) test -count=1 -timeout 60m -run '^$$' -bench . -skip '$(SCALE_BENCHES)' -benchtime 5x ./... | tee $(BENCH_OUT)
	@echo "benchmark report: $(BENCH_OUT)"

# Issue 18's scale benchmarks, each in its own lab, one after the other
# (about 30 minutes): the overlay at 5,001 nodes beside flanneld, the
# policy loop at 50,000 pods and at 5,000, one agent's API bytes, and the
# per-connection cost with 1,000 policies.
SCALE_BENCHES = BenchmarkOverlay5000Nodes|BenchmarkProgrammingAt50000Pods|BenchmarkAgentAPIBytes
SCALE_OUT ?= bench/scale-report.txt
bench-scale: deps tools
	@mkdir -p $(dir $(SCALE_OUT))
	{ $(GO) test -count=1 -timeout 30m -run '^$$' -bench 'BenchmarkOverlay5000Nodes' -benchtime 1x -v ./test/overlayscale/ && \
	  $(GO) test -count=1 -timeout 30m -run '^$$' -bench 'BenchmarkProgrammingAt50000Pods|BenchmarkProgrammingAtScale' -benchtime 1x ./test/bench/policyscale/ && \
	  $(GO) test -count=1 -timeout 20m -run '^$$' -bench 'BenchmarkAgentAPIBytes' -benchtime 1x -v ./test/apicost/ && \
	  $(GO) test -count=1 -timeout 20m -run '^$$' -bench 'BenchmarkConnectFlatCost' -benchtime 15x ./test/policye2e/ ; } 2>&1 | tee $(SCALE_OUT)
	@echo "scale report: $(SCALE_OUT)"

# The lab is a real cluster: every node runs the kubelet and containerd,
# and Sluice installs the way a cluster installs it, kubectl apply of the
# manifest, whose DaemonSet runs as containers of the image built from the
# Dockerfile. The demo then shows NetworkPolicy at work through kubectl exec
# into agnhost pods, and fails if it does not.
lab: deps build tools images
	$(BIN)/sluicectl lab up --nodes 3 --runtime containerd --cni manifest --manifest manifests/sluice.yaml
	$(BIN)/sluicectl lab demo

lab-down: build
	$(BIN)/sluicectl lab down

lint:
	@out="$$(gofmt -l $$(git ls-files '*.go'))"; if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...

clean:
	rm -rf $(BIN) bench
