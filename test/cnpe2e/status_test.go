package cnpe2e

import (
	"context"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
)

// conditions returns a policy's conditions by type.
func conditions(t *testing.T, name string) map[string]metav1.Condition {
	t.Helper()
	o, err := cnps.PolicyV1beta1().ClusterNetworkPolicies().Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]metav1.Condition{}
	for _, c := range o.Status.Conditions {
		out[c.Type] = c
	}
	return out
}

// waitConditions waits until every node reports the status wanted for the
// policy's current generation.
func waitConditions(t *testing.T, name string, want metav1.ConditionStatus) map[string]metav1.Condition {
	t.Helper()
	var got map[string]metav1.Condition
	_ = wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		got = conditions(t, name)
		for _, n := range shared.Nodes {
			if c, ok := got["Programmed-"+n.Name]; !ok || c.Status != want {
				return false, nil
			}
		}
		return true, nil
	})
	for _, n := range shared.Nodes {
		if c := got["Programmed-"+n.Name]; c.Status != want {
			t.Fatalf("node %s reports %+v for %s, want status %s", n.Name, c, name, want)
		}
	}
	return got
}

// TestStatusConditionsAndKubectlGetCNP: every agent reports whether it
// programmed a ClusterNetworkPolicy, per node, for the current
// generation; a policy Sluice cannot fully enforce (a domainNames peer)
// reports False with the reason; `kubectl get cnp` lists
// ClusterNetworkPolicies, not Calico's NetworkPolicies.
func TestStatusConditionsAndKubectlGetCNP(t *testing.T) {
	applyYAML(t, `
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: status-ok}
spec:
  tier: Admin
  priority: 100
  subject: {namespaces: {matchLabels: {ns: x}}}
  ingress: [{action: Pass, from: [{namespaces: {}}]}]`, `
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: status-domains}
spec:
  tier: Admin
  priority: 101
  subject: {namespaces: {matchLabels: {ns: x}}}
  egress: [{action: Accept, to: [{domainNames: [example.com]}]}]`)
	ok := waitConditions(t, "status-ok", metav1.ConditionTrue)
	for typ, c := range ok {
		if c.Reason != "Programmed" || c.ObservedGeneration != 1 {
			t.Errorf("%s: %+v", typ, c)
		}
	}
	bad := waitConditions(t, "status-domains", metav1.ConditionFalse)
	for typ, c := range bad {
		if c.Reason != "NotProgrammed" || !strings.Contains(c.Message, "domainNames") {
			t.Errorf("%s: %+v", typ, c)
		}
	}
	// A new generation is reported again.
	o, err := cnps.PolicyV1beta1().ClusterNetworkPolicies().Get(context.Background(), "status-ok", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	o.Spec.Priority = 102
	if _, err := cnps.PolicyV1beta1().ClusterNetworkPolicies().Update(context.Background(), o, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := wait.PollUntilContextTimeout(context.Background(), 200*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		for _, c := range conditions(t, "status-ok") {
			if c.ObservedGeneration != 2 {
				return false, nil
			}
		}
		return true, nil
	}); err != nil {
		t.Errorf("generation 2 not reported by every node: %+v", conditions(t, "status-ok"))
	}

	out, err := shared.Kubectl(context.Background(), "", "get", "cnp", "-o", "name")
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if !strings.Contains(out, "clusternetworkpolicy.policy.networking.k8s.io/status-ok") {
		t.Errorf("kubectl get cnp: %s", out)
	}
	out, err = shared.Kubectl(context.Background(), "", "get", "cnp")
	if err != nil || !strings.Contains(out, "TIER") || !strings.Contains(out, "Admin") {
		t.Errorf("kubectl get cnp (%v):\n%s", err, out)
	}
	t.Logf("kubectl get cnp:\n%s", out)
}
