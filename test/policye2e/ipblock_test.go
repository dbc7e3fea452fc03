package policye2e

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/policy"
	"github.com/sluice-net/sluice/test/labtest"
)

func egressPolicy(ns, name, pod string, blocks ...networkingv1.IPBlock) *networkingv1.NetworkPolicy {
	var to []networkingv1.NetworkPolicyPeer
	for i := range blocks {
		to = append(to, networkingv1.NetworkPolicyPeer{IPBlock: &blocks[i]})
	}
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: *sel("pod", pod), PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
		Egress: []networkingv1.NetworkPolicyEgressRule{{To: to}}}}
}

func ingressPolicy(ns, name, pod string, blocks ...networkingv1.IPBlock) *networkingv1.NetworkPolicy {
	var from []networkingv1.NetworkPolicyPeer
	for i := range blocks {
		from = append(from, networkingv1.NetworkPolicyPeer{IPBlock: &blocks[i]})
	}
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: *sel("pod", pod), Ingress: []networkingv1.NetworkPolicyIngressRule{{From: from}}}}
}

// TestIPBlockEdgesDualStack is issue #10's truth table on real nodes: the
// "allow by IP" policies every user writes (/0 of each family, with and
// without except, an except equal to its block), in both families of a
// dual-stack cluster, where a block of one family must leave the other
// family's traffic to the policy's default deny.
func TestIPBlockEdgesDualStack(t *testing.T) {
	apply(t,
		// x/a: egress to all of IPv4 except the pods; over IPv6, nothing.
		egressPolicy("x", "v4-world", "a", networkingv1.IPBlock{CIDR: "0.0.0.0/0", Except: []string{"10.244.0.0/16"}}),
		// x/b: egress to both /0s: open in both families.
		egressPolicy("x", "everything", "b", networkingv1.IPBlock{CIDR: "0.0.0.0/0"}, networkingv1.IPBlock{CIDR: "::/0"}),
		// y/a: ingress from all of IPv6; over IPv4, nothing.
		ingressPolicy("y", "v6-only", "a", networkingv1.IPBlock{CIDR: "::/0"}),
		// z/c: ingress from the pods' /16 in one rule with a v6 block.
		ingressPolicy("z", "several", "c", networkingv1.IPBlock{CIDR: "10.244.0.0/16", Except: []string{"10.244.0.0/17"}}, networkingv1.IPBlock{CIDR: "fd00:10:244::/56"}),
	)
	// An except equal to its block: the API server refuses it ("must be a
	// strict subset"); Sluice's conversion handles it anyway (the peer
	// matches nothing), which the packet tracer covers.
	exceptAll := ingressPolicy("y", "except-all", "b", networkingv1.IPBlock{CIDR: "10.244.0.0/16", Except: []string{"10.244.0.0/16"}})
	if _, err := shared.Client.NetworkingV1().NetworkPolicies("y").Create(context.Background(), exceptAll, metav1.CreateOptions{}); !apierrors.IsInvalid(err) {
		t.Errorf("the API server took an except equal to its cidr (%v); add it to the table", err)
		_ = shared.Client.NetworkingV1().NetworkPolicies("y").Delete(context.Background(), exceptAll.Name, metav1.DeleteOptions{})
	}
	for _, v6 := range []bool{false, true} {
		checkTableFamily(t, "ipBlock edges", []int32{80}, []policy.Protocol{policy.TCP, policy.UDP}, v6)
	}
	// The outside world, in both families: x/a reaches it over IPv4 only,
	// x/b over both.
	for _, c := range []struct {
		from string
		v6   bool
		want bool
	}{{"x/a", false, true}, {"x/a", true, false}, {"x/b", false, true}, {"x/b", true, true}} {
		_, err := shared.ProbeEventually(c.from, "external", lab.ExternalPort, false, c.v6, 5*time.Second)
		if got := err == nil; got != c.want {
			t.Errorf("%s -> external (ipv6=%v): reached %v, want %v (%v)", c.from, c.v6, got, c.want, err)
		}
	}
	// No node reports a policy it could not program (before issue #10,
	// the /0 policies failed every sync on every node).
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range shared.Nodes {
		out, err := labtest.Command(bins+"/sluicectl", "status", "--lab-dir", shared.Dir, "--node", n.Name)
		if err != nil || strings.Contains(out, "fail closed") || strings.Contains(out, "last error") {
			t.Errorf("%s status: %v\n%s", n.Name, err, out)
		}
	}
}

// TestIPBlockWithHostBits: the API server either refuses an ipBlock
// whose cidr has host bits set, or takes it, and then it means its
// network, as everywhere else.
func TestIPBlockWithHostBits(t *testing.T) {
	np := ingressPolicy("z", "host-bits", "a", networkingv1.IPBlock{CIDR: "10.244.0.77/16"})
	_, err := shared.Client.NetworkingV1().NetworkPolicies("z").Create(context.Background(), np, metav1.CreateOptions{})
	if apierrors.IsInvalid(err) {
		t.Logf("the API server refuses host bits: %v", err)
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = shared.Client.NetworkingV1().NetworkPolicies("z").Delete(context.Background(), np.Name, metav1.DeleteOptions{})
	})
	if p := policy.FromNetworkPolicy(np); p.IngressRules[0].Src.Peers[0].CIDR != netip.MustParsePrefix("10.244.0.0/16") {
		t.Errorf("converted to %v", p.IngressRules[0].Src.Peers[0].CIDR)
	}
	checkTable(t, "ipBlock with host bits", []int32{80}, []policy.Protocol{policy.TCP})
}
