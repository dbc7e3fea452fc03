// Package crdgen generates the CustomResourceDefinitions of the Calico
// policy kinds from the Go types of github.com/projectcalico/api, so the
// schemas follow the module Sluice decodes with: what the API server
// accepts, the agent's informers can decode.
//
// It writes two sets from the same types: projectcalico.org/v3 (what
// Sluice serves, shipped in manifests/sluice.yaml) and
// crd.projectcalico.org/v1 (what a Canal cluster already has, for the
// migration tests).
package crdgen

import (
	"fmt"
	"reflect"
	"sort"
	"strings"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	"github.com/projectcalico/api/pkg/lib/numorstring"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/yaml"
)

// Kind is one resource: its names, scope and spec type.
type Kind struct {
	Kind, Plural, Singular string
	ShortNames             []string
	Namespaced             bool
	Spec                   reflect.Type
	// Columns are extra kubectl get columns: name and JSON path.
	Columns [][2]string
}

// Kinds are the policy kinds, with the names, short names and scopes of
// Calico's native v3 CRDs, so a later move to real Calico keeps the
// stored objects. One short name differs: Calico's "cnp" for its
// NetworkPolicy is ClusterNetworkPolicy's short name upstream, and
// `kubectl get cnp` means ClusterNetworkPolicy here (use
// caliconetworkpolicy).
var Kinds = []Kind{
	{Kind: "NetworkPolicy", Plural: "networkpolicies", Singular: "networkpolicy", ShortNames: []string{"caliconetworkpolicy"},
		Namespaced: true, Spec: reflect.TypeFor[v3.NetworkPolicySpec](), Columns: policyColumns},
	{Kind: "GlobalNetworkPolicy", Plural: "globalnetworkpolicies", Singular: "globalnetworkpolicy", ShortNames: []string{"gnp", "cgnp"},
		Spec: reflect.TypeFor[v3.GlobalNetworkPolicySpec](), Columns: policyColumns},
	{Kind: "NetworkSet", Plural: "networksets", Singular: "networkset", Namespaced: true, Spec: reflect.TypeFor[v3.NetworkSetSpec]()},
	{Kind: "GlobalNetworkSet", Plural: "globalnetworksets", Singular: "globalnetworkset", Spec: reflect.TypeFor[v3.GlobalNetworkSetSpec]()},
	{Kind: "Tier", Plural: "tiers", Singular: "tier", Spec: reflect.TypeFor[v3.TierSpec](),
		Columns: [][2]string{{"Order", ".spec.order"}, {"DefaultAction", ".spec.defaultAction"}}},
	{Kind: "StagedNetworkPolicy", Plural: "stagednetworkpolicies", Singular: "stagednetworkpolicy", Namespaced: true,
		Spec: reflect.TypeFor[v3.StagedNetworkPolicySpec](), Columns: policyColumns},
	{Kind: "StagedGlobalNetworkPolicy", Plural: "stagedglobalnetworkpolicies", Singular: "stagedglobalnetworkpolicy",
		Spec: reflect.TypeFor[v3.StagedGlobalNetworkPolicySpec](), Columns: policyColumns},
	{Kind: "StagedKubernetesNetworkPolicy", Plural: "stagedkubernetesnetworkpolicies", Singular: "stagedkubernetesnetworkpolicy", Namespaced: true,
		Spec: reflect.TypeFor[v3.StagedKubernetesNetworkPolicySpec]()},
}

var policyColumns = [][2]string{{"Tier", ".spec.tier"}, {"Order", ".spec.order"}}

// Group is one API group and version to generate for.
type Group struct {
	Group, Version string
	// ShortNames says whether to define the short names (the v1 CRDs of
	// a Canal cluster have none; defining them twice would make kubectl
	// guess).
	ShortNames bool
}

var (
	// V3 is what Sluice serves.
	V3 = Group{Group: "projectcalico.org", Version: "v3", ShortNames: true}
	// CanalV1 is where Canal's calicoctl stores the same specs.
	CanalV1 = Group{Group: "crd.projectcalico.org", Version: "v1"}
)

// Generate renders the CRDs of every kind in a group as one YAML stream.
func Generate(g Group) ([]byte, error) {
	var docs []string
	for _, k := range Kinds {
		b, err := yaml.Marshal(crd(g, k))
		if err != nil {
			return nil, fmt.Errorf("rendering the %s CRD: %w", k.Kind, err)
		}
		docs = append(docs, string(b))
	}
	return []byte("---\n" + strings.Join(docs, "---\n")), nil
}

func crd(g Group, k Kind) map[string]any {
	scope := "Cluster"
	if k.Namespaced {
		scope = "Namespaced"
	}
	names := map[string]any{"kind": k.Kind, "listKind": k.Kind + "List", "plural": k.Plural, "singular": k.Singular}
	if g.ShortNames && len(k.ShortNames) > 0 {
		names["shortNames"] = k.ShortNames
	}
	version := map[string]any{
		"name": g.Version, "served": true, "storage": true,
		"schema": map[string]any{"openAPIV3Schema": map[string]any{
			"type": "object",
			"properties": map[string]any{
				"apiVersion": map[string]any{"type": "string"},
				"kind":       map[string]any{"type": "string"},
				"metadata":   map[string]any{"type": "object"},
				"spec":       schemaOf(k.Spec, k.Kind+".spec"),
			},
		}},
	}
	if len(k.Columns) > 0 {
		var cols []map[string]any
		for _, c := range k.Columns {
			typ := "string"
			if c[0] == "Order" {
				typ = "number"
			}
			cols = append(cols, map[string]any{"name": c[0], "jsonPath": c[1], "type": typ})
		}
		version["additionalPrinterColumns"] = cols
	}
	return map[string]any{
		"apiVersion": "apiextensions.k8s.io/v1",
		"kind":       "CustomResourceDefinition",
		"metadata": map[string]any{
			"name": k.Plural + "." + g.Group,
			// The part label lets an operator leave the CRDs, and so the
			// stored policies, out of a kubectl delete of the manifest.
			"labels": map[string]any{"app.kubernetes.io/name": "sluice", "sluice.dev/part": "calico-crds"},
		},
		"spec": map[string]any{"group": g.Group, "names": names, "scope": scope, "versions": []any{version}},
	}
}

// Types the reflection walk renders specially.
var (
	portType     = reflect.TypeFor[numorstring.Port]()
	protocolType = reflect.TypeFor[numorstring.Protocol]()
	intstrType   = reflect.TypeFor[intstr.IntOrString]()
	actionType   = reflect.TypeFor[v3.Action]()
	policyType   = reflect.TypeFor[v3.PolicyType]()
	ruleType     = reflect.TypeFor[v3.Rule]()
)

// maxRules bounds a policy's rules per direction.
const maxRules = 500

// fieldSchemas are fields narrower than their type.
var fieldSchemas = map[string]map[string]any{
	// "defaultAction: Deny or Pass".
	"Tier.spec.defaultAction": {"type": "string", "enum": []any{"Deny", "Pass"}},
	"Tier.spec.order":         {"type": "number"},
}

// portPattern is what numorstring.PortFromString accepts as a string: a
// number or a "min:max" range of numbers that fit 16 bits, or a name;
// portRangeRule holds what the pattern cannot, that a range is in order.
// A string that decodes to an error would stop every informer of the
// kind, so the API server must refuse it.
const (
	portNumber    = `(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})`
	portPattern   = `^(` + portNumber + `(:` + portNumber + `)?|[a-zA-Z0-9_.-]{1,128})$`
	portRangeRule = `type(self) == int || !self.contains(':') || ` +
		`int(self.substring(0, self.indexOf(':'))) <= int(self.substring(self.indexOf(':') + 1))`
)

// schemaOf renders the structural schema of a Go type as the JSON decoder
// reads it.
func schemaOf(t reflect.Type, path string) map[string]any {
	if s, ok := fieldSchemas[path]; ok {
		return s
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	switch t {
	case portType:
		return map[string]any{"x-kubernetes-int-or-string": true, "pattern": portPattern, "maxLength": 128, "minimum": 0, "maximum": 65535,
			"x-kubernetes-validations": []any{map[string]any{"rule": portRangeRule, "message": "a port range must be min:max with min <= max"}}}
	case protocolType:
		return map[string]any{"x-kubernetes-int-or-string": true, "minimum": 1, "maximum": 255}
	case intstrType:
		return map[string]any{"x-kubernetes-int-or-string": true}
	case actionType:
		return map[string]any{"type": "string", "enum": []any{"Allow", "Deny", "Log", "Pass"}}
	case policyType:
		return map[string]any{"type": "string", "enum": []any{"Ingress", "Egress"}}
	}
	switch t.Kind() {
	case reflect.String:
		return map[string]any{"type": "string"}
	case reflect.Bool:
		return map[string]any{"type": "boolean"}
	case reflect.Int, reflect.Int32, reflect.Int64, reflect.Uint8, reflect.Uint16, reflect.Uint32:
		return map[string]any{"type": "integer"}
	case reflect.Float32, reflect.Float64:
		return map[string]any{"type": "number"}
	case reflect.Slice:
		s := map[string]any{"type": "array", "items": schemaOf(t.Elem(), path+"[]")}
		switch t.Elem() {
		case portType:
			// As Calico's own CRDs; it also bounds the port rule's cost.
			s["maxItems"] = 50
		case ruleType:
			// The API server estimates the port rule's cost over every
			// rule the array may hold; without a bound it refuses it.
			s["maxItems"] = maxRules
		}
		return s
	case reflect.Map:
		return map[string]any{"type": "object", "additionalProperties": schemaOf(t.Elem(), path+"{}")}
	case reflect.Struct:
		props := map[string]any{}
		structProps(t, path, props)
		return map[string]any{"type": "object", "properties": props}
	}
	panic(fmt.Sprintf("crdgen: %s: no schema for %s", path, t))
}

// structProps adds a struct's JSON fields, inlining embedded ones.
func structProps(t reflect.Type, path string, props map[string]any) {
	fields := reflect.VisibleFields(t)
	sort.SliceStable(fields, func(i, j int) bool { return fields[i].Index[0] < fields[j].Index[0] })
	for _, f := range fields {
		if len(f.Index) > 1 || !f.IsExported() {
			continue
		}
		name, opts, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if f.Anonymous && (name == "" || strings.Contains(opts, "inline")) {
			structProps(f.Type, path, props)
			continue
		}
		if name == "" {
			name = f.Name
		}
		props[name] = schemaOf(f.Type, path+"."+name)
	}
}
