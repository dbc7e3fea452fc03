//go:build tools

// Package tools pins crictl, the CRI client the real-node tests use to
// drive containerd's pod sandboxes directly.
package tools

import (
	_ "sigs.k8s.io/cri-tools/cmd/crictl"
)
