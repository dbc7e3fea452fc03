package policy

import (
	"context"
	"encoding/json"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	k8stesting "k8s.io/client-go/testing"
	cnpv1beta1 "sigs.k8s.io/network-policy-api/apis/v1beta1"
	cnpfake "sigs.k8s.io/network-policy-api/pkg/client/clientset/versioned/fake"
	cnpinformers "sigs.k8s.io/network-policy-api/pkg/client/informers/externalversions"

	"github.com/sluice-net/sluice/cni/endpointapi"
	"github.com/sluice-net/sluice/internal/nettest"
)

// TestLoopProgramsClusterNetworkPolicies: ClusterNetworkPolicies from the
// module's typed clientset select the local endpoints and reach the
// kernel; a nodes peer fills a set with the node's addresses from its
// Node object; each policy gets this node's status condition, False with
// the reason for one the agent cannot fully read.
func TestLoopProgramsClusterNetworkPolicies(t *testing.T) {
	deny := &cnpv1beta1.ClusterNetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "deny-y", Generation: 1, ResourceVersion: "1"}, Spec: cnpv1beta1.ClusterNetworkPolicySpec{
		Tier: cnpv1beta1.AdminTier, Priority: 1,
		Subject: cnpv1beta1.ClusterNetworkPolicySubject{Namespaces: &metav1.LabelSelector{MatchLabels: map[string]string{"ns": "x"}}},
		Ingress: []cnpv1beta1.ClusterNetworkPolicyIngressRule{{Action: cnpv1beta1.ClusterNetworkPolicyRuleActionDeny,
			From: []cnpv1beta1.ClusterNetworkPolicyIngressPeer{{Namespaces: &metav1.LabelSelector{MatchLabels: map[string]string{"ns": "y"}}}}}},
		Egress: []cnpv1beta1.ClusterNetworkPolicyEgressRule{{Action: cnpv1beta1.ClusterNetworkPolicyRuleActionDeny,
			To: []cnpv1beta1.ClusterNetworkPolicyEgressPeer{{Nodes: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "control-plane"}}}}}},
	}}
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "cp", Labels: map[string]string{"role": "control-plane"}, ResourceVersion: "1"},
		Status: corev1.NodeStatus{Addresses: []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.0.2.77"}, {Type: corev1.NodeHostName, Address: "cp"}}}}
	cs := cnpfake.NewSimpleClientset(deny)
	netns := nettest.NewNS(t)
	eps := []endpointapi.Endpoint{localEndpoint("x/a", "10.244.1.2"), localEndpoint("x/b", "10.244.1.3")}
	h := runLoop(t, netns, Config{}, func(l *Loop) { l.WithClusterNetworkPolicies(cs) }, eps, append(apiObjects(), runtime.Object(node))...)
	key := ClusterNetworkPolicyKey + "deny-y"
	h.waitFor("the CNP selecting x/a", func(s Status) bool {
		return s.Ready && slices.Contains(s.EndpointPolicies[vethOf("x/a")], key) && slices.Contains(s.EndpointPolicies[vethOf("x/b")], key)
	})
	kernel := h.save()
	if chain := PolicyChain(key, false); !strings.Contains(kernel, "-A "+chain+" -m set --match-set") || !strings.Contains(kernel, "-j DROP") {
		t.Errorf("the Deny rule is not in the kernel:\n%s", kernel)
	}
	sets, err := exec.Command("ip", "netns", "exec", nettest.Name(netns), "ipset", "save").CombinedOutput()
	if err != nil {
		t.Fatalf("ipset save: %v: %s", err, sets)
	}
	if !strings.Contains(string(sets), "192.0.2.77") {
		t.Errorf("the node's address is in no set:\n%s", sets)
	}
	waitCondition(t, cs, "deny-y", metav1.ConditionTrue, "Programmed")

	bad := &cnpv1beta1.ClusterNetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "domains", Generation: 1}, Spec: cnpv1beta1.ClusterNetworkPolicySpec{
		Tier: cnpv1beta1.AdminTier, Priority: 2,
		Subject: cnpv1beta1.ClusterNetworkPolicySubject{Namespaces: &metav1.LabelSelector{}},
		Egress: []cnpv1beta1.ClusterNetworkPolicyEgressRule{{Action: cnpv1beta1.ClusterNetworkPolicyRuleActionAccept,
			To: []cnpv1beta1.ClusterNetworkPolicyEgressPeer{{DomainNames: []cnpv1beta1.DomainName{"example.com"}}}}},
	}}
	if _, err := cs.PolicyV1beta1().ClusterNetworkPolicies().Create(context.Background(), bad, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	h.waitFor("the unreadable CNP reported", func(s Status) bool {
		return strings.Contains(s.NotProgrammed[ClusterNetworkPolicyKey+"domains"], "domainNames")
	})
	c := waitCondition(t, cs, "domains", metav1.ConditionFalse, "NotProgrammed")
	if !strings.Contains(c.Message, "domainNames") {
		t.Errorf("condition message: %q", c.Message)
	}
}

// waitCondition waits for node-1's server-side apply of its condition on
// a policy's status, with its own field manager. The fake clientset
// records the apply (it has no schema to merge it with; the lab test
// test/cnpe2e reads the conditions back from a real API server).
func waitCondition(t *testing.T, cs *cnpfake.Clientset, name string, status metav1.ConditionStatus, reason string) metav1.Condition {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		for _, a := range cs.Actions() {
			p, ok := a.(k8stesting.PatchAction)
			if !ok || p.GetName() != name || p.GetSubresource() != "status" || p.GetPatchType() != types.ApplyPatchType {
				continue
			}
			var o cnpv1beta1.ClusterNetworkPolicy
			if err := json.Unmarshal(p.GetPatch(), &o); err != nil {
				t.Fatal(err)
			}
			for _, c := range o.Status.Conditions {
				if c.Type == "Programmed-node-1" && c.Status == status && c.Reason == reason && c.ObservedGeneration == 1 {
					return c
				}
			}
		}
	}
	t.Fatalf("%s: node-1 applied no Programmed-node-1 %s/%s condition; actions %v", name, status, reason, cs.Actions())
	return metav1.Condition{}
}

// TestCNPStatusWriterForgetsDeletedPolicies: the writer applies a
// condition once per generation and reason, writes again when the
// generation changes, and forgets a policy once it is deleted, so its
// memory follows the policies that exist.
func TestCNPStatusWriterForgetsDeletedPolicies(t *testing.T) {
	objs := []*cnpv1beta1.ClusterNetworkPolicy{
		{ObjectMeta: metav1.ObjectMeta{Name: "a", Generation: 1}},
		{ObjectMeta: metav1.ObjectMeta{Name: "b", Generation: 1}},
	}
	cs := cnpfake.NewSimpleClientset(objs[0].DeepCopy(), objs[1].DeepCopy())
	l := NewLoop(Config{NodeName: "node-1"}, nil, nil).WithClusterNetworkPolicies(cs)
	l.cnp.informer = cnpinformers.NewSharedInformerFactory(cs, 0).Policy().V1beta1().ClusterNetworkPolicies().Informer()
	store := l.cnp.informer.GetStore()
	for _, o := range objs {
		if err := store.Add(o); err != nil {
			t.Fatal(err)
		}
	}
	ctx := context.Background()
	applies := func() int {
		n := 0
		for _, a := range cs.Actions() {
			if p, ok := a.(k8stesting.PatchAction); ok && p.GetSubresource() == "status" {
				n++
			}
		}
		return n
	}
	l.writeCNPConditions(ctx, map[string]string{})
	if got := applies(); got != 2 || len(l.cnp.written) != 2 {
		t.Fatalf("first write: %d applies, remembered %v", got, l.cnp.written)
	}
	// The informer's copies now carry the condition, as the API's would.
	for _, o := range objs {
		o.Status.Conditions = []metav1.Condition{{Type: cnpConditionPrefix + "node-1", ObservedGeneration: o.Generation}}
	}
	l.writeCNPConditions(ctx, map[string]string{})
	if got := applies(); got != 2 {
		t.Errorf("nothing changed, yet %d applies in all", got)
	}
	if err := store.Delete(objs[1]); err != nil {
		t.Fatal(err)
	}
	objs[0].Generation = 2
	l.writeCNPConditions(ctx, map[string]string{})
	if got := applies(); got != 3 {
		t.Errorf("a new generation of a: %d applies in all, want 3", got)
	}
	if _, ok := l.cnp.written["b"]; ok || len(l.cnp.written) != 1 {
		t.Errorf("the deleted policy is still remembered: %v", l.cnp.written)
	}
}
