package crdgen

import (
	"bytes"
	"os"
	"slices"
	"testing"

	"sigs.k8s.io/yaml"

	"github.com/sluice-net/sluice/manifests"
)

// TestCommittedCRDsAreCurrent: the CRDs in manifests/ are what the
// generator makes from the module's types now (run `make generate`).
func TestCommittedCRDsAreCurrent(t *testing.T) {
	want, err := UpdateManifest(manifests.Sluice)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(want, manifests.Sluice) {
		t.Error("manifests/sluice.yaml's Calico CRDs are stale: run make generate")
	}
	canal, err := CanalCRDs()
	if err != nil {
		t.Fatal(err)
	}
	if committed, err := os.ReadFile("../../manifests/canal-crds.yaml"); err != nil || !bytes.Equal(committed, canal) {
		t.Errorf("manifests/canal-crds.yaml is stale (%v): run make generate", err)
	}
}

// TestUpdateManifestKeepsTheRest: the generator rewrites its own section
// only, and twice is once.
func TestUpdateManifestKeepsTheRest(t *testing.T) {
	base := []byte("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x}\n")
	once, err := UpdateManifest(base)
	if err != nil {
		t.Fatal(err)
	}
	twice, err := UpdateManifest(once)
	if err != nil || !bytes.Equal(once, twice) || !bytes.HasPrefix(once, base) {
		t.Fatalf("not idempotent or lost the rest (%v)", err)
	}
	edited := append(bytes.Clone(once), "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: after}\n"...)
	again, err := UpdateManifest(edited)
	if err != nil || !bytes.Equal(again, edited) {
		t.Fatalf("text after the section changed (%v)", err)
	}
}

// TestPortsAreIntOrString: `ports: [80, "8000:8080", "http"]` is what the
// schema must let through, so the field is int-or-string.
func TestPortsAreIntOrString(t *testing.T) {
	var crd map[string]any
	if err := yaml.Unmarshal([]byte(mustFirst(t)), &crd); err != nil {
		t.Fatal(err)
	}
	s := dig(t, crd, "spec", "versions", 0, "schema", "openAPIV3Schema", "properties", "spec", "properties", "ingress", "items",
		"properties", "destination", "properties", "ports", "items")
	if s["x-kubernetes-int-or-string"] != true {
		t.Errorf("ports items: %v", s)
	}
}

func mustFirst(t *testing.T) string {
	b, err := Generate(V3)
	if err != nil {
		t.Fatal(err)
	}
	docs := bytes.Split(b, []byte("---\n"))
	return string(docs[1])
}

func dig(t *testing.T, v any, path ...any) map[string]any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			v = v.(map[string]any)[k]
		case int:
			v = v.([]any)[k]
		}
		if v == nil {
			t.Fatalf("no %v", p)
		}
	}
	return v.(map[string]any)
}

// TestCommittedCNPCRDsAreCurrent: manifests/sluice-cnp-crds.yaml is the
// module's own CRD file, for the module version go.mod requires, and
// defines the short name cnp that the Calico NetworkPolicy CRD gave up.
func TestCommittedCNPCRDsAreCurrent(t *testing.T) {
	mod, err := CNPModuleDir(".")
	if err != nil {
		t.Fatal(err)
	}
	want, err := CNPCRDs(mod)
	if err != nil {
		t.Fatal(err)
	}
	if committed, err := os.ReadFile("../../manifests/sluice-cnp-crds.yaml"); err != nil || !bytes.Equal(committed, want) {
		t.Errorf("manifests/sluice-cnp-crds.yaml is stale (%v): run make generate", err)
	}
	if !bytes.Contains(want, []byte("shortNames:\n    - cnp\n")) || !bytes.Contains(want, []byte("storage: true")) {
		t.Error("the ClusterNetworkPolicy CRD lost its short name cnp or its storage version")
	}
	for _, k := range Kinds {
		if slices.Contains(k.ShortNames, "cnp") {
			t.Errorf("%s still claims the short name cnp", k.Kind)
		}
	}
}
