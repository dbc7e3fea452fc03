package policy

import (
	"encoding/json"
	"testing"

	cnpv1beta1 "sigs.k8s.io/network-policy-api/apis/v1beta1"
)

// FuzzFromClusterNetworkPolicy feeds arbitrary specs (what a CRD of
// another version, or none, could store) to the converter: it must never
// panic, every rule it makes must have an action, and what the evaluator
// and the rendered rules decide must agree for the fuzz world's flows.
func FuzzFromClusterNetworkPolicy(f *testing.F) {
	for _, s := range []string{
		`{"tier":"Admin","priority":1,"subject":{"namespaces":{}},"ingress":[{"action":"Deny","from":[{"namespaces":{"matchLabels":{"ns":"y"}}}]}]}`,
		`{"tier":"Baseline","priority":0,"subject":{"pods":{"namespaceSelector":{},"podSelector":{"matchLabels":{"pod":"a"}}}},"egress":[{"action":"Accept","to":[{"networks":["10.0.0.0/8"]},{"nodes":{}}],"protocols":[{"tcp":{"destinationPort":{"range":{"start":80,"end":90}}}}]}]}`,
		`{"tier":"Admin","subject":{},"ingress":[{"action":"Pass","from":[{}]}],"egress":[{"action":"Accept","to":[{"domainNames":["x.io"]}],"protocols":[{}]}]}`,
		`{"tier":"Nope","subject":{"namespaces":{"matchExpressions":[{"key":"a","operator":"Bogus"}]}},"ingress":[{"action":"Maybe","from":[{"pods":{"namespaceSelector":{},"podSelector":{}}}],"protocols":[{"destinationNamedPort":"http"}]}]}`,
		`{"tier":"Admin","subject":{"namespaces":{}},"egress":[{"action":"Deny","to":[{"networks":["not-a-cidr","::/0"]}]}]}`,
	} {
		f.Add([]byte(s))
	}
	w := cnpWorld()
	f.Fuzz(func(t *testing.T, data []byte) {
		var o cnpv1beta1.ClusterNetworkPolicy
		if json.Unmarshal(data, &o.Spec) != nil {
			return
		}
		o.Name = "fuzz"
		p := FromClusterNetworkPolicy(&o)
		if p.Tier == nil || p.PodSelector == nil {
			t.Fatalf("no tier or pod selector: %+v", p)
		}
		for _, rules := range [][]Rule{p.IngressRules, p.EgressRules} {
			for _, r := range rules {
				if r.Action == "" {
					t.Fatalf("a rule without an action: %+v", r)
				}
			}
		}
		p.Broken = ""
		pols := []*Policy{p}
		if n, first := w.disagreements(t, pols, w.render(pols, false), false); n > 0 {
			t.Fatalf("%d flows disagree; first: %s", n, first)
		}
	})
}
