package cnpe2e

// Truth tables of ClusterNetworkPolicy's interplay with NetworkPolicy and
// Calico tiers, probed with real connections between pods on two real
// nodes. Each table starts with a control: the rows that the
// ClusterNetworkPolicy is about to change, observed before it exists.

import "testing"

const allowAllToXA = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: all-to-a}
spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{}]}`

func TestAdminDenyOverridesNetworkPolicyAllow(t *testing.T) {
	applyYAML(t, allowAllToXA)
	checkRows(t, "control: the NetworkPolicy allows", []row{{"y/b", "x/a", false, true}, {"y/a", "x/a", true, true}})
	applyYAML(t, `
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: deny-y-to-xa}
spec:
  tier: Admin
  priority: 10
  subject: {pods: {namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}}
  ingress: [{action: Deny, from: [{namespaces: {matchLabels: {ns: "y"}}}]}]`)
	checkRows(t, "an Admin Deny overrides the NetworkPolicy's allow", []row{
		{"y/b", "x/a", false, false}, {"y/a", "x/a", true, false}, {"x/b", "x/a", false, true}, {"y/b", "x/b", false, true}})
}

func TestAdminPassLetsNetworkPolicyDecide(t *testing.T) {
	applyYAML(t, `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: from-yb}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: "y"}}, podSelector: {matchLabels: {pod: b}}}]}]`, `
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: deny-into-x}
spec:
  tier: Admin
  priority: 20
  subject: {namespaces: {matchLabels: {ns: x}}}
  ingress: [{action: Deny, from: [{namespaces: {}}]}]`)
	checkRows(t, "control: the Admin Deny drops what the NetworkPolicy allows", []row{{"y/b", "x/a", false, false}, {"y/b", "x/b", false, false}})
	applyYAML(t, `
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: pass-from-y}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {ns: x}}}
  ingress: [{action: Pass, from: [{namespaces: {matchLabels: {ns: "y"}}}]}]`)
	checkRows(t, "after an Admin Pass the NetworkPolicy decides", []row{
		{"y/b", "x/a", false, true}, {"y/a", "x/a", false, false}, {"x/b", "x/a", false, false},
		{"y/b", "x/b", false, true}, {"y/a", "x/b", true, true}})
}

func TestBaselineDenyOnlyWhereNoNetworkPolicySelects(t *testing.T) {
	applyYAML(t, allowAllToXA)
	checkRows(t, "control: open without the Baseline policy", []row{{"y/b", "x/b", false, true}, {"x/a", "y/a", true, true}})
	applyYAML(t, `
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: isolate-x-y}
spec:
  tier: Baseline
  priority: 0
  subject: {namespaces: {matchExpressions: [{key: ns, operator: In, values: [x, "y"]}]}}
  ingress: [{action: Deny, from: [{namespaces: {}}]}]`)
	checkRows(t, "the Baseline Deny applies only to pods no NetworkPolicy selects", []row{
		{"y/b", "x/a", false, true}, {"x/b", "x/a", true, true}, {"y/b", "x/b", false, false}, {"x/a", "y/a", true, false}, {"x/a", "y/b", false, false}})
}

func TestAdminAcceptDoesNotOpenDestinationIngress(t *testing.T) {
	applyYAML(t, `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: "y", name: closed-a}
spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress]}`, `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: b-no-egress}
spec: {podSelector: {matchLabels: {pod: b}}, policyTypes: [Egress]}`)
	checkRows(t, "control: x/b may not send, y/a may not receive", []row{{"x/b", "y/b", false, false}, {"y/b", "y/a", false, false}})
	applyYAML(t, `
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: xb-to-y}
spec:
  tier: Admin
  priority: 5
  subject: {pods: {namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: b}}}}
  egress: [{action: Accept, to: [{namespaces: {matchLabels: {ns: "y"}}}]}]`)
	checkRows(t, "the Admin egress Accept opens x/b's egress, not y/a's ingress", []row{
		{"x/b", "y/b", false, true}, {"x/b", "y/b", true, true}, {"x/b", "y/a", false, false}, {"x/b", "x/a", false, false}})
}

func TestCalicoTiersSitBetweenAdminAndBaseline(t *testing.T) {
	applyYAML(t, `
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}`, `
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.deny-y}
spec:
  tier: security
  namespaceSelector: "ns in {'x', 'y'}"
  types: [Ingress]
  ingress: [{action: Deny, source: {namespaceSelector: "ns == 'y'"}}, {action: Pass}]`)
	checkRows(t, "control: the Calico tier denies from y", []row{{"y/b", "x/a", false, false}, {"x/b", "y/a", false, true}})
	applyYAML(t, `
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: yb-to-xa}
spec:
  tier: Admin
  priority: 0
  subject: {namespaces: {matchLabels: {ns: x}}}
  ingress: [{action: Accept, from: [{pods: {namespaceSelector: {matchLabels: {ns: "y"}}, podSelector: {matchLabels: {pod: b}}}}]}]`, `
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: baseline-from-x}
spec:
  tier: Baseline
  priority: 0
  subject: {namespaces: {matchLabels: {ns: "y"}}}
  ingress: [{action: Deny, from: [{namespaces: {matchLabels: {ns: x}}}]}]`)
	checkRows(t, "Admin before the Calico tier, Baseline after what it passed on", []row{
		{"y/b", "x/a", false, true}, {"y/a", "x/a", false, false}, {"x/b", "y/a", false, false}, {"x/a", "y/b", true, false}, {"y/a", "y/b", false, false}})
}
