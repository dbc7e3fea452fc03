// Command gen writes the generated CRDs (`make generate`): the
// projectcalico.org/v3 set into its section of manifests/sluice.yaml, and
// the crd.projectcalico.org/v1 set of a Canal cluster into
// manifests/canal-crds.yaml, and the ClusterNetworkPolicy CRD that
// sigs.k8s.io/network-policy-api publishes into
// manifests/sluice-cnp-crds.yaml.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/sluice-net/sluice/internal/crdgen"
)

func main() {
	dir := flag.String("manifests", "manifests", "the manifests directory")
	flag.Parse()
	if err := run(*dir); err != nil {
		fmt.Fprintln(os.Stderr, "crdgen:", err)
		os.Exit(1)
	}
}

func run(dir string) error {
	path := filepath.Join(dir, "sluice.yaml")
	manifest, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	updated, err := crdgen.UpdateManifest(manifest)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if err := os.WriteFile(path, updated, 0o644); err != nil {
		return err
	}
	canal, err := crdgen.CanalCRDs()
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "canal-crds.yaml"), canal, 0o644); err != nil {
		return err
	}
	mod, err := crdgen.CNPModuleDir(".")
	if err != nil {
		return err
	}
	cnp, err := crdgen.CNPCRDs(mod)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "sluice-cnp-crds.yaml"), cnp, 0o644)
}
