package policy

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	cnpv1beta1 "sigs.k8s.io/network-policy-api/apis/v1beta1"
	cnpfake "sigs.k8s.io/network-policy-api/pkg/client/clientset/versioned/fake"

	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/nettest"
)

// denyToNode is a ClusterNetworkPolicy of a tier that denies namespace x's
// egress to the node's own addresses.
func denyToNode(name string, tier cnpv1beta1.Tier, nets ...string) *cnpv1beta1.ClusterNetworkPolicy {
	var cidrs []cnpv1beta1.CIDR
	for _, n := range nets {
		cidrs = append(cidrs, cnpv1beta1.CIDR(n))
	}
	return &cnpv1beta1.ClusterNetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: name, Generation: 1}, Spec: cnpv1beta1.ClusterNetworkPolicySpec{
		Tier: tier, Priority: 5,
		Subject: cnpv1beta1.ClusterNetworkPolicySubject{Namespaces: &metav1.LabelSelector{MatchLabels: map[string]string{"ns": "x"}}},
		Egress: []cnpv1beta1.ClusterNetworkPolicyEgressRule{{Action: cnpv1beta1.ClusterNetworkPolicyRuleActionDeny,
			To: []cnpv1beta1.ClusterNetworkPolicyEgressPeer{{Networks: cidrs}}}},
	}}
}

// TestPodToOwnNodeTraffic: traffic from a pod to its own node goes
// through INPUT, not FORWARD. A NetworkPolicy that denies all egress
// leaves it alone (Kubernetes always allows a pod's own node); an Admin
// Deny to the node's addresses drops it, in both families, even next to
// that NetworkPolicy; a Baseline Deny drops it only while no
// NetworkPolicy selects the pod; deleting the policies opens it again.
func TestPodToOwnNodeTraffic(t *testing.T) {
	addrs := map[string][2]string{"x/a": {"10.244.1.2", "fd00:10:244:1::2"}}
	pn := wirePods(t, addrs)
	node := nettest.Name(pn.node)
	nodeIPs := [2]netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}
	nettest.Run(t, "ip", "-n", node, "addr", "add", "192.0.2.1/32", "dev", "uplink")
	nettest.Run(t, "ip", "-n", node, "addr", "add", "2001:db8::1/128", "dev", "uplink", "nodad")
	cs := cnpfake.NewSimpleClientset()
	h := runLoop(t, pn.node, Config{IPv6: true}, func(l *Loop) { l.WithClusterNetworkPolicies(cs) }, pn.eps, apiPods(addrs)...)
	h.waitFor("the first sync", func(s Status) bool { return s.Ready })
	got := [2]<-chan netip.Addr{serve(t, pn.node, "4"), serve(t, pn.node, "6")}
	a := [2]netip.Addr{netip.MustParseAddr(addrs["x/a"][0]), netip.MustParseAddr(addrs["x/a"][1])}
	reaches := func(fi int) bool {
		err, udp := connect(t, pn.pods["x/a"], a[fi], nodeIPs[fi], got[fi])
		return err == nil && udp
	}
	expect := func(what string, want bool) {
		t.Helper()
		for fi, fam := range []string{"IPv4", "IPv6"} {
			if r := reaches(fi); r != want {
				t.Errorf("%s, %s: the pod reaches its node = %v, want %v", what, fam, r, want)
			}
		}
	}
	expect("control, no policy", true)

	h.create(netpol("x", "deny-egress", networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}}))
	h.waitFor("the NetworkPolicy", func(s Status) bool { return s.Selected["x/deny-egress"] == 1 })
	expect("a NetworkPolicy denying all egress", true)

	ctx := context.Background()
	cnps := cs.PolicyV1beta1().ClusterNetworkPolicies()
	for _, p := range []*cnpv1beta1.ClusterNetworkPolicy{denyToNode("admin", cnpv1beta1.AdminTier, "192.0.2.1/32", "2001:db8::1/128"), denyToNode("baseline", cnpv1beta1.BaselineTier, "192.0.2.0/24", "2001:db8::/64")} {
		if _, err := cnps.Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	h.waitFor("both ClusterNetworkPolicies", func(s Status) bool {
		return s.Selected[ClusterNetworkPolicyKey+"admin"] == 1 && s.Selected[ClusterNetworkPolicyKey+"baseline"] == 1
	})
	if kernel := h.save(); !strings.Contains(kernel, "-g "+HostChain(vethOf("x/a"))) {
		t.Errorf("no host chain for the pod:\n%s", kernel)
	}
	expect("an Admin Deny to the node", false)

	if err := cnps.Delete(ctx, "admin", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h.waitFor("the Admin policy gone", func(s Status) bool { _, ok := s.Selected[ClusterNetworkPolicyKey+"admin"]; return !ok })
	expect("a Baseline Deny, while a NetworkPolicy selects the pod", true)

	if err := h.client.NetworkingV1().NetworkPolicies("x").Delete(ctx, "deny-egress", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h.waitFor("the NetworkPolicy gone", func(s Status) bool { _, ok := s.Selected["x/deny-egress"]; return !ok })
	expect("a Baseline Deny, with no NetworkPolicy", false)

	if err := cnps.Delete(ctx, "baseline", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	h.waitFor("the Baseline policy gone", func(s Status) bool { _, ok := s.Selected[ClusterNetworkPolicyKey+"baseline"]; return !ok })
	expect("every policy deleted", true)
}

// TestTrafficToOwnNodeAgreesWithTheEvaluator renders random
// ClusterNetworkPolicies beside random Calico and Kubernetes policies and
// traces every flow from a local pod to an address of its own node
// through SLUICE-TO-HOST, in both families: the verdicts must be the
// evaluator's with ToOwnNode set. The control: the same flows evaluated
// as forwarded traffic disagree for some seed, so the check can fail.
func TestTrafficToOwnNodeAgreesWithTheEvaluator(t *testing.T) {
	w := cnpWorld()
	differ := 0
	for seed := int64(1); seed <= 120; seed++ {
		pols := randomHostTrafficPolicies(seed)
		e := &Evaluator{Policies: pols, NetworkSets: w.netsets, Namespaces: w.nss}
		for _, ipv6 := range []bool{false, true} {
			rs := w.render(pols, ipv6)
			for _, fl := range w.flows(ipv6) {
				if fl.flow.Src.Pod == nil || fl.flow.Dst.Pod != nil {
					continue
				}
				fl.flow.ToOwnNode = true
				want := e.Verdict(fl.flow).Allowed()
				tr := &tracer{t: t, rs: rs}
				got := tr.run(contract.ToHostChain, &fl.pkt, 0) != verdictDrop
				if got != want {
					t.Fatalf("seed %d ipv6=%v: %s -> own node %s %s dport %d: rules allow=%v, evaluator %v", seed, ipv6, fl.pkt.src, fl.pkt.dst, fl.pkt.proto, fl.pkt.dport, got, want)
				}
				fl.flow.ToOwnNode = false
				if e.Verdict(fl.flow).Egress.Allowed != want {
					differ++
				}
			}
		}
	}
	if differ == 0 {
		t.Fatal("no flow to the own node is decided otherwise than a forwarded one: the check cannot tell them apart")
	}
	t.Logf("%d flows to the own node decided otherwise than forwarded", differ)
}

// randomHostTrafficPolicies is one seed's random ClusterNetworkPolicies
// (1 to 4) beside random Calico and Kubernetes policies (0 to 2).
func randomHostTrafficPolicies(seed int64) []*Policy {
	g := newTierGen(seed)
	pols := randomCNPs(g.rnd, g.pick(4)+1)
	for i := g.pick(3); i > 0; i-- {
		pols = append(pols, g.policy(i))
	}
	return pols
}

// TestExplainToOwnNodeAgreesWithTheEvaluatorAndTheRules explains every
// flow from a pod to an address of its own node under random
// ClusterNetworkPolicies beside random Calico and Kubernetes policies:
// the verdict is the evaluator's with ToOwnNode set, and the kernel check
// over the rendered rules finds SLUICE-TO-HOST's jump to the pod's FH
// chain exactly when a ClusterNetworkPolicy decides, and the deciding
// rule there. The controls: some of these flows are decided otherwise
// than the same flow forwarded, and a deleted SLUICE-TO-HOST jump is
// reported.
func TestExplainToOwnNodeAgreesWithTheEvaluatorAndTheRules(t *testing.T) {
	w := cnpWorld()
	reasons := map[string]int{}
	differ, driftCaught := 0, 0
	for seed := int64(1); seed <= 80; seed++ {
		pols := randomHostTrafficPolicies(seed)
		e := &Evaluator{Policies: pols, NetworkSets: w.netsets, Namespaces: w.nss}
		m, r := w.snapshot(pols, false)
		rs := r.RenderWithSets(m.policies, m.locals, m.pods, m.namespaces, m.netsets)
		save := saveOf(rs)
		for _, fl := range w.flows(false) {
			if fl.flow.Src.Pod == nil || fl.flow.Dst.Pod != nil {
				continue
			}
			fl.flow.ToOwnNode = true
			x := e.Explain(fl.flow, true)
			where := fmt.Sprintf("seed %d %s -> own node %s %s/%d", seed, fl.pkt.src, fl.pkt.dst, fl.flow.Proto, fl.flow.DstPort)
			if want := e.Verdict(fl.flow).Egress.Allowed; x.Allowed != want || !x.ToOwnNode {
				t.Fatalf("%s: explain says allowed=%v (to own node %v), the evaluator %v", where, x.Allowed, x.ToOwnNode, want)
			}
			reasons[x.Reason]++
			if x.Reason == ReasonRule {
				checkNamedRule(t, where, e, fl.flow, x, true)
			}
			ep := m.local(x.Endpoint)
			k := compareKernel(save, r, m, ep, &x, true)
			if len(k.Problems) > 0 || !k.Programmed {
				t.Fatalf("%s (%s): the kernel check disagrees with rules rendered from the same model: %v", where, x.Summary, k.Problems)
			}
			decided := x.Reason != ReasonOwnNode
			if decided && (len(k.DecidingRules) == 0 || k.Packets == 0 || k.DecidingChain == "") {
				t.Fatalf("%s (%s): no deciding rule found in %s", where, x.Summary, k.DecidingChain)
			}
			if decided && hostDispatched(save, ep.HostVeth) {
				if k := compareKernel(saveWithout(rs, contract.ToHostChain, "-g "+HostChain(ep.HostVeth)), r, m, ep, &x, true); len(k.Problems) > 0 {
					driftCaught++
				} else {
					t.Fatalf("%s: the SLUICE-TO-HOST jump is gone and the kernel check did not notice", where)
				}
			}
			fl.flow.ToOwnNode = false
			if e.Explain(fl.flow, true).Allowed != x.Allowed {
				differ++
			}
		}
	}
	for _, r := range []string{ReasonOwnNode, ReasonRule} {
		if reasons[r] == 0 {
			t.Errorf("no flow to the own node was decided by %s; the world does not cover it (%v)", r, reasons)
		}
	}
	if differ == 0 || driftCaught == 0 {
		t.Fatalf("controls: %d flows decided otherwise than forwarded, %d deleted jumps reported; both must be > 0", differ, driftCaught)
	}
	t.Logf("reasons %v; %d flows decided otherwise than forwarded", reasons, differ)
}

// saveWithout is saveOf with the rules of chain that contain part removed.
func saveWithout(rs *Ruleset, chain, part string) string {
	cut := &Ruleset{Chains: map[string][]string{}}
	for name, rules := range rs.Chains {
		if name == chain {
			rules = slices.DeleteFunc(slices.Clone(rules), func(r string) bool { return strings.Contains(r, part) })
		}
		cut.Chains[name] = rules
	}
	return saveOf(cut)
}

// TestOwnAddressReadsTheNodesNamespace: explain takes a pod's flow to an
// address of its node's namespace as traffic to its own node, and one to
// any other address as forwarded (the control).
func TestOwnAddressReadsTheNodesNamespace(t *testing.T) {
	n := nettest.NewNS(t)
	name := nettest.Name(n)
	nettest.Run(t, "ip", "-n", name, "link", "add", "own0", "type", "veth", "peer", "name", "own1")
	nettest.Run(t, "ip", "-n", name, "addr", "add", "198.51.100.7/24", "dev", "own0")
	nettest.Run(t, "ip", "-n", name, "addr", "add", "2001:db8::7/64", "dev", "own0", "nodad")
	l := &Loop{netns: n}
	for addr, want := range map[string]bool{"198.51.100.7": true, "2001:db8::7": true, "198.51.100.8": false, "2001:db8::8": false} {
		got, err := l.ownAddress(netip.MustParseAddr(addr))
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("ownAddress(%s) = %v, want %v", addr, got, want)
		}
	}
}
