package crdgen

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The ClusterNetworkPolicy CRD is not generated from types here: it is
// the file sigs.k8s.io/network-policy-api publishes, copied from the
// module go.mod requires (its experimental channel: the standard fields
// plus the nodes peer and destinationNamedPort Sluice implements), so
// what operators install is byte for byte what that project ships.
const (
	CNPModule  = "sigs.k8s.io/network-policy-api"
	cnpCRDPath = "config/crd/experimental/policy.networking.k8s.io_clusternetworkpolicies.yaml"
)

// CNPModuleDir is the directory of the network-policy-api module in the
// module cache, as `go list` finds it from dir (a directory of this
// repository).
func CNPModuleDir(dir string) (string, error) {
	cmd := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", CNPModule)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		return "", fmt.Errorf("finding %s: %w", CNPModule, err)
	}
	d := strings.TrimSpace(string(out))
	if d == "" {
		return "", fmt.Errorf("finding %s: not in the module cache (go mod download %s)", CNPModule, CNPModule)
	}
	return d, nil
}

// CNPCRDs is manifests/sluice-cnp-crds.yaml: the module's experimental
// ClusterNetworkPolicy CRD with a header saying where it comes from.
func CNPCRDs(moduleDir string) ([]byte, error) {
	crd, err := os.ReadFile(filepath.Join(moduleDir, cnpCRDPath))
	if err != nil {
		return nil, err
	}
	version := filepath.Base(moduleDir) // network-policy-api@v0.3.0
	header := fmt.Sprintf("# The ClusterNetworkPolicy CRD (policy.networking.k8s.io), copied unchanged by\n"+
		"# `make generate` (internal/crdgen) from %s/%s in the module cache\n"+
		"# (%s, the version go.mod requires). Install it before or after Sluice:\n"+
		"#   kubectl apply -f manifests/sluice-cnp-crds.yaml\n---\n", CNPModule, cnpCRDPath, version)
	return append([]byte(header), bytes.TrimPrefix(crd, []byte("---\n"))...), nil
}
