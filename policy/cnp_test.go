package policy

import (
	"fmt"
	"math/rand"
	"net/netip"
	"strings"
	"testing"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	cnpv1beta1 "sigs.k8s.io/network-policy-api/apis/v1beta1"
)

// cnpWorld is the tiered world with two nodes, which nodes peers select
// by their labels.
func cnpWorld() *tierWorld {
	w := newTierWorld()
	w.netsets = append(w.netsets,
		FromNode("n1", map[string]string{"role": "worker"}, []string{"192.168.0.11", "fd00:192::11"}),
		FromNode("n2", map[string]string{"role": "control-plane"}, []string{"192.168.0.12", "fd00:192::12", "n2.example"}))
	for _, a := range []string{"192.168.0.11", "192.168.0.12", "fd00:192::11", "fd00:192::12"} {
		w.outside = append(w.outside, netip.MustParseAddr(a))
	}
	return w
}

// cnp converts a ClusterNetworkPolicy written as YAML (spec only; the
// name is the first line's comment-free "name: x").
func cnp(t *testing.T, doc string) *Policy {
	t.Helper()
	var o cnpv1beta1.ClusterNetworkPolicy
	mustYAML(t, "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\n"+doc, &o)
	return FromClusterNetworkPolicy(&o)
}

// TestClusterNetworkPolicyTiers checks the interplay of the Admin and
// Baseline tiers with NetworkPolicy and Calico tiers, by the evaluator
// and by the rendered rules of both families.
func TestClusterNetworkPolicyTiers(t *testing.T) {
	w := cnpWorld()
	allowAllToXA := k8sPolicy(t, `
metadata: {namespace: x, name: all-to-a}
spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{}]}`)
	for _, tc := range []struct {
		name string
		pols []*Policy
		rows []calicoCase
	}{{
		name: "control: the NetworkPolicy alone allows",
		pols: []*Policy{allowAllToXA},
		rows: []calicoCase{{"y/b", "x/a", TCP, 80, true}, {"x/b", "x/a", TCP, 80, true}},
	}, {
		name: "an Admin Deny overrides a NetworkPolicy allow",
		pols: []*Policy{allowAllToXA, cnp(t, `
metadata: {name: deny-y}
spec:
  tier: Admin
  priority: 10
  subject: {pods: {namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}}
  ingress: [{action: Deny, from: [{namespaces: {matchLabels: {ns: "y"}}}]}]`)},
		rows: []calicoCase{{"y/b", "x/a", TCP, 80, false}, {"y/a", "x/a", UDP, 53, false}, {"x/b", "x/a", TCP, 80, true}},
	}, {
		name: "an Admin Pass lets the NetworkPolicy decide, a later Admin Deny does not",
		pols: []*Policy{k8sPolicy(t, `
metadata: {namespace: x, name: from-yb}
spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{from: [{namespaceSelector: {matchLabels: {ns: "y"}}, podSelector: {matchLabels: {pod: b}}}]}]}`),
			cnp(t, `
metadata: {name: pass-y}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {ns: x}}}
  ingress: [{action: Pass, from: [{namespaces: {matchLabels: {ns: "y"}}}]}]`),
			cnp(t, `
metadata: {name: deny-all}
spec:
  tier: Admin
  priority: 20
  subject: {namespaces: {}}
  ingress: [{action: Deny, from: [{namespaces: {}}]}]`)},
		rows: []calicoCase{{"y/b", "x/a", TCP, 80, true}, {"y/a", "x/a", TCP, 80, false}, {"x/b", "x/a", TCP, 80, false},
			{"y/b", "x/b", TCP, 80, true}, {"x/a", "y/a", TCP, 80, false}},
	}, {
		name: "a Baseline Deny applies only where no NetworkPolicy selects the pod",
		pols: []*Policy{k8sPolicy(t, `
metadata: {namespace: x, name: all-to-a}
spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress], ingress: [{}]}`),
			cnp(t, `
metadata: {name: isolate}
spec:
  tier: Baseline
  priority: 0
  subject: {namespaces: {}}
  ingress: [{action: Deny, from: [{namespaces: {}}]}]
  egress: [{action: Deny, to: [{networks: [203.0.113.0/24, "2001:db7::/64"]}]}]`)},
		rows: []calicoCase{{"y/b", "x/a", TCP, 80, true}, {"y/b", "x/b", TCP, 80, false}, {"x/a", "y/a", TCP, 80, false},
			{"x/a", "203.0.113.1", TCP, 80, false}, {"x/a", "2001:db7::1", TCP, 80, false}, {"x/a", "198.18.0.254", TCP, 80, true},
			{"203.0.113.1", "x/b", TCP, 80, true}},
	}, {
		name: "an Admin Accept opens its own direction, not the destination's ingress",
		pols: []*Policy{k8sPolicy(t, `
metadata: {namespace: "y", name: closed}
spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress]}`),
			k8sPolicy(t, `
metadata: {namespace: x, name: no-egress}
spec: {podSelector: {matchLabels: {pod: b}}, policyTypes: [Egress]}`),
			cnp(t, `
metadata: {name: xb-out}
spec:
  tier: Admin
  priority: 5
  subject: {pods: {namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: b}}}}
  egress: [{action: Accept, to: [{namespaces: {matchLabels: {ns: "y"}}}]}]`)},
		rows: []calicoCase{{"x/b", "y/a", TCP, 80, false}, {"x/b", "y/b", TCP, 80, true}, {"x/b", "x/a", TCP, 80, false},
			{"x/b", "203.0.113.1", TCP, 80, false}},
	}, {
		name: "an Admin ingress Accept overrides a NetworkPolicy that isolates the pod",
		pols: []*Policy{k8sPolicy(t, `
metadata: {namespace: "y", name: closed}
spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress]}`),
			cnp(t, `
metadata: {name: to-ya}
spec:
  tier: Admin
  priority: 5
  subject: {pods: {namespaceSelector: {matchLabels: {ns: "y"}}, podSelector: {matchLabels: {pod: a}}}}
  ingress: [{action: Accept, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {role: web}}}}], protocols: [{tcp: {destinationPort: {range: {start: 79, end: 81}}}}]}]`)},
		rows: []calicoCase{{"x/b", "y/a", TCP, 80, true}, {"y/b", "y/a", TCP, 80, true}, {"x/a", "y/a", TCP, 80, false},
			{"x/b", "y/a", TCP, 1000, false}, {"x/b", "y/a", UDP, 53, false}},
	}, {
		name: "priorities order the Admin tier: lower first",
		pols: []*Policy{
			cnp(t, `
metadata: {name: z-accept}
spec: {tier: Admin, priority: 1, subject: {namespaces: {}}, ingress: [{action: Accept, from: [{namespaces: {matchLabels: {ns: x}}}]}]}`),
			cnp(t, `
metadata: {name: a-deny}
spec: {tier: Admin, priority: 2, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}]}]}`)},
		rows: []calicoCase{{"x/a", "y/a", TCP, 80, true}, {"y/b", "y/a", TCP, 80, false}, {"203.0.113.1", "y/a", TCP, 80, true}},
	}, {
		name: "named ports, nodes and networks peers",
		pols: []*Policy{cnp(t, `
metadata: {name: egress}
spec:
  tier: Admin
  priority: 1
  subject: {pods: {namespaceSelector: {matchLabels: {ns: x}}, podSelector: {matchLabels: {pod: a}}}}
  egress:
  - {action: Accept, to: [{pods: {namespaceSelector: {}, podSelector: {}}}], protocols: [{destinationNamedPort: dns}]}
  - {action: Deny, to: [{nodes: {matchLabels: {role: control-plane}}}, {networks: [198.18.0.0/24]}]}
  - {action: Accept, to: [{nodes: {matchExpressions: [{key: role, operator: Exists}]}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}
  - {action: Deny, to: [{nodes: {}}, {namespaces: {matchLabels: {ns: "y"}}}]}`)},
		rows: []calicoCase{{"x/a", "y/a", UDP, 53, true}, {"x/a", "y/a", TCP, 80, false}, {"x/a", "y/a", UDP, 81, false},
			{"x/a", "192.168.0.12", TCP, 80, false}, {"x/a", "fd00:192::12", TCP, 80, false}, {"x/a", "192.168.0.11", TCP, 80, true},
			{"x/a", "192.168.0.11", UDP, 53, false}, {"x/a", "198.18.0.254", TCP, 80, false}, {"x/a", "203.0.113.1", TCP, 80, true},
			{"x/a", "x/b", TCP, 80, true}, {"x/b", "192.168.0.12", TCP, 80, true}},
	}, {
		name: "Calico tiers sit between Admin and Baseline, even a tier without an order",
		pols: []*Policy{
			calicoGNP(t, "security", `
metadata: {name: deny-y}
spec: {tier: security, selector: all(), types: [Ingress], ingress: [{action: Deny, source: {namespaceSelector: "ns == 'y'"}}, {action: Pass}]}`),
			calicoGNP(t, "unordered", `
metadata: {name: dns-from-x}
spec: {tier: unordered, selector: all(), types: [Ingress], ingress: [{action: Allow, protocol: UDP, source: {namespaceSelector: "ns == 'x'"}}]}`),
			cnp(t, `
metadata: {name: yb-to-xa}
spec: {tier: Admin, priority: 0, subject: {namespaces: {matchLabels: {ns: x}}}, ingress: [{action: Accept, from: [{pods: {namespaceSelector: {matchLabels: {ns: "y"}}, podSelector: {matchLabels: {pod: b}}}}]}]}`),
			cnp(t, `
metadata: {name: baseline}
spec: {tier: Baseline, priority: 0, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}]}]}`)},
		rows: []calicoCase{{"y/b", "x/a", TCP, 80, true}, {"y/a", "x/a", TCP, 80, false}, {"y/b", "y/a", TCP, 80, false},
			{"x/b", "y/a", UDP, 53, true}, {"x/b", "y/a", TCP, 80, false}, {"203.0.113.1", "y/a", TCP, 80, true}},
	}} {
		t.Run(tc.name, func(t *testing.T) { w.check(t, tc.pols, tc.rows) })
	}
}

// calicoGNP converts a GlobalNetworkPolicy in the test tiers, plus a
// tier without an order.
func calicoGNP(t *testing.T, _ string, doc string) *Policy {
	t.Helper()
	var o v3.GlobalNetworkPolicy
	mustYAML(t, "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\n"+doc, &o)
	base := testTiers()
	p := FromCalicoGlobalNetworkPolicy(&o, func(name string) *Tier {
		if name == "unordered" {
			return &Tier{Name: "unordered", Order: NoOrder, DefaultAction: Pass}
		}
		return base(name)
	})
	if p.Broken != "" {
		t.Fatal(p.Broken)
	}
	return p
}

// TestClusterNetworkPolicyFailsClosed: a peer or protocol of a kind this
// version does not know makes an Accept match nothing and a Deny or Pass
// match everything, and Broken says so.
func TestClusterNetworkPolicyFailsClosed(t *testing.T) {
	w := cnpWorld()
	mk := func(action cnpv1beta1.ClusterNetworkPolicyRuleAction, protocols []cnpv1beta1.ClusterNetworkPolicyProtocol, peers ...cnpv1beta1.ClusterNetworkPolicyIngressPeer) *Policy {
		o := &cnpv1beta1.ClusterNetworkPolicy{}
		o.Name = "unknown-" + strings.ToLower(string(action))
		o.Spec = cnpv1beta1.ClusterNetworkPolicySpec{Tier: cnpv1beta1.AdminTier, Priority: 1,
			Subject: cnpv1beta1.ClusterNetworkPolicySubject{Namespaces: &metav1LabelSelector},
			Ingress: []cnpv1beta1.ClusterNetworkPolicyIngressRule{{Action: action, From: peers, Protocols: protocols}}}
		p := FromClusterNetworkPolicy(o)
		if p.Broken == "" {
			t.Errorf("%s: Broken is empty", o.Name)
		}
		p.Broken = "" // check refuses broken policies; this one is meant to be
		return p
	}
	unknown := cnpv1beta1.ClusterNetworkPolicyIngressPeer{}
	fromY := cnpv1beta1.ClusterNetworkPolicyIngressPeer{Namespaces: &metav1LabelSelectorY}
	isolateXA := k8sPolicy(t, `
metadata: {namespace: x, name: closed}
spec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Ingress]}`)
	// An Accept with an unknown peer still accepts from the peers it knows.
	w.check(t, []*Policy{isolateXA, mk(cnpv1beta1.ClusterNetworkPolicyRuleActionAccept, nil, unknown, fromY)},
		[]calicoCase{{"y/b", "x/a", TCP, 80, true}, {"x/b", "x/a", TCP, 80, false}})
	// An Accept whose one protocol is unknown matches nothing.
	w.check(t, []*Policy{isolateXA, mk(cnpv1beta1.ClusterNetworkPolicyRuleActionAccept, []cnpv1beta1.ClusterNetworkPolicyProtocol{{}}, fromY)},
		[]calicoCase{{"y/b", "x/a", TCP, 80, false}})
	// A Deny with an unknown peer denies everything to its subject.
	w.check(t, []*Policy{mk(cnpv1beta1.ClusterNetworkPolicyRuleActionDeny, nil, unknown, fromY)},
		[]calicoCase{{"y/b", "x/a", TCP, 80, false}, {"x/b", "x/a", TCP, 80, false}, {"203.0.113.1", "x/a", UDP, 53, false}})
	// A Deny with an unknown protocol denies every port.
	w.check(t, []*Policy{mk(cnpv1beta1.ClusterNetworkPolicyRuleActionDeny, []cnpv1beta1.ClusterNetworkPolicyProtocol{{}, {TCP: &cnpv1beta1.ClusterNetworkPolicyProtocolTCP{}}}, fromY)},
		[]calicoCase{{"y/b", "x/a", UDP, 53, false}, {"x/b", "x/a", UDP, 53, true}})
}

var (
	metav1LabelSelector  = *must(cnpLabelSelector(""))
	metav1LabelSelectorY = *must(cnpLabelSelector("y"))
)

// TestClusterNetworkPoliciesAgreeWithTheEvaluator renders random
// ClusterNetworkPolicies of both tiers beside random Calico and
// Kubernetes policies, and traces every flow of the world through the
// rules in both families: the verdicts must be the evaluator's.
func TestClusterNetworkPoliciesAgreeWithTheEvaluator(t *testing.T) {
	w := cnpWorld()
	for seed := int64(1); seed <= 120; seed++ {
		g := newTierGen(seed)
		pols := randomCNPs(g.rnd, g.pick(4)+1)
		for i := g.pick(3); i > 0; i-- {
			pols = append(pols, g.policy(i))
		}
		for _, ipv6 := range []bool{false, true} {
			if n, first := w.disagreements(t, pols, w.render(pols, ipv6), ipv6); n > 0 {
				t.Fatalf("seed %d ipv6=%v: %d flows disagree; first: %s", seed, ipv6, n, first)
			}
		}
	}
}

// TestClusterNetworkPolicyTracerCatchesTierOrder is the control of the
// agreement test: rules that run the Baseline tier as if it were the
// Admin tier must disagree with the evaluator.
func TestClusterNetworkPolicyTracerCatchesTierOrder(t *testing.T) {
	w := cnpWorld()
	pols := []*Policy{
		k8sPolicy(t, `
metadata: {namespace: x, name: all-to-a}
spec: {podSelector: {matchLabels: {pod: a}}, ingress: [{}]}`),
		cnp(t, `
metadata: {name: baseline}
spec: {tier: Baseline, priority: 0, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}]}]}`),
	}
	if n, first := w.disagreements(t, pols, w.render(pols, false), false); n != 0 {
		t.Fatalf("the right rendering disagrees: %s", first)
	}
	wrong := *pols[1]
	wrong.Tier = adminTier
	if n, _ := w.disagreements(t, pols, w.render([]*Policy{pols[0], &wrong}, false), false); n == 0 {
		t.Fatal("rules with Baseline run first agree with the evaluator: the check cannot fail")
	}
}

// randomCNPs makes n random ClusterNetworkPolicies over the world.
func randomCNPs(rnd *rand.Rand, n int) []*Policy {
	var out []*Policy
	for i := 0; i < n; i++ {
		o := &cnpv1beta1.ClusterNetworkPolicy{}
		o.Name = fmt.Sprintf("cnp-%d", i)
		o.Spec.Tier = []cnpv1beta1.Tier{cnpv1beta1.AdminTier, cnpv1beta1.BaselineTier}[rnd.Intn(2)]
		o.Spec.Priority = int32(rnd.Intn(3))
		if rnd.Intn(2) == 0 {
			o.Spec.Subject.Namespaces = randomSelector(rnd, "ns", "x", "y")
		} else {
			o.Spec.Subject.Pods = &cnpv1beta1.NamespacedPod{NamespaceSelector: *randomSelector(rnd, "ns", "x", "y"), PodSelector: *randomSelector(rnd, "pod", "a", "b")}
		}
		for j := rnd.Intn(3); j > 0; j-- {
			r := cnpv1beta1.ClusterNetworkPolicyIngressRule{Action: randomAction(rnd), Protocols: randomProtocols(rnd)}
			for k := rnd.Intn(2) + 1; k > 0; k-- {
				r.From = append(r.From, randomIngressPeer(rnd))
			}
			o.Spec.Ingress = append(o.Spec.Ingress, r)
		}
		for j := rnd.Intn(3); j > 0; j-- {
			r := cnpv1beta1.ClusterNetworkPolicyEgressRule{Action: randomAction(rnd), Protocols: randomProtocols(rnd)}
			for k := rnd.Intn(2) + 1; k > 0; k-- {
				r.To = append(r.To, randomEgressPeer(rnd, r.Protocols))
			}
			o.Spec.Egress = append(o.Spec.Egress, r)
		}
		out = append(out, FromClusterNetworkPolicy(o))
	}
	return out
}

func randomAction(rnd *rand.Rand) cnpv1beta1.ClusterNetworkPolicyRuleAction {
	return []cnpv1beta1.ClusterNetworkPolicyRuleAction{cnpv1beta1.ClusterNetworkPolicyRuleActionAccept,
		cnpv1beta1.ClusterNetworkPolicyRuleActionDeny, cnpv1beta1.ClusterNetworkPolicyRuleActionPass}[rnd.Intn(3)]
}

func randomSelector(rnd *rand.Rand, key string, values ...string) *metav1.LabelSelector {
	if rnd.Intn(3) == 0 {
		return &metav1.LabelSelector{}
	}
	return &metav1.LabelSelector{MatchLabels: map[string]string{key: values[rnd.Intn(len(values))]}}
}

func randomIngressPeer(rnd *rand.Rand) cnpv1beta1.ClusterNetworkPolicyIngressPeer {
	if rnd.Intn(2) == 0 {
		return cnpv1beta1.ClusterNetworkPolicyIngressPeer{Namespaces: randomSelector(rnd, "ns", "x", "y")}
	}
	return cnpv1beta1.ClusterNetworkPolicyIngressPeer{Pods: &cnpv1beta1.NamespacedPod{
		NamespaceSelector: *randomSelector(rnd, "team", "red", "blue"), PodSelector: *randomSelector(rnd, "role", "db", "web")}}
}

func randomEgressPeer(rnd *rand.Rand, protocols []cnpv1beta1.ClusterNetworkPolicyProtocol) cnpv1beta1.ClusterNetworkPolicyEgressPeer {
	named := false
	for _, p := range protocols {
		named = named || p.DestinationNamedPort != ""
	}
	if named || rnd.Intn(2) == 0 {
		// "networks/nodes peer cannot be set with namedPorts"
		in := randomIngressPeer(rnd)
		return cnpv1beta1.ClusterNetworkPolicyEgressPeer{Namespaces: in.Namespaces, Pods: in.Pods}
	}
	if rnd.Intn(2) == 0 {
		return cnpv1beta1.ClusterNetworkPolicyEgressPeer{Nodes: randomSelector(rnd, "role", "worker", "control-plane")}
	}
	nets := []cnpv1beta1.CIDR{"198.18.0.0/24", "0.0.0.0/0", "10.244.0.0/16", "192.168.0.12/32", "2001:db8::/64", "::/0", "fd00:10:244:1::/64"}
	return cnpv1beta1.ClusterNetworkPolicyEgressPeer{Networks: []cnpv1beta1.CIDR{nets[rnd.Intn(len(nets))], nets[rnd.Intn(len(nets))]}}
}

func randomProtocols(rnd *rand.Rand) []cnpv1beta1.ClusterNetworkPolicyProtocol {
	var out []cnpv1beta1.ClusterNetworkPolicyProtocol
	for i := rnd.Intn(3); i > 0; i-- {
		port := []*cnpv1beta1.Port{nil, {Number: 80}, {Number: 53}, {Range: &cnpv1beta1.PortRange{Start: 50, End: 1000}}}[rnd.Intn(4)]
		switch rnd.Intn(4) {
		case 0:
			out = append(out, cnpv1beta1.ClusterNetworkPolicyProtocol{TCP: &cnpv1beta1.ClusterNetworkPolicyProtocolTCP{DestinationPort: port}})
		case 1:
			out = append(out, cnpv1beta1.ClusterNetworkPolicyProtocol{UDP: &cnpv1beta1.ClusterNetworkPolicyProtocolUDP{DestinationPort: port}})
		case 2:
			out = append(out, cnpv1beta1.ClusterNetworkPolicyProtocol{SCTP: &cnpv1beta1.ClusterNetworkPolicyProtocolSCTP{DestinationPort: port}})
		default:
			out = append(out, cnpv1beta1.ClusterNetworkPolicyProtocol{DestinationNamedPort: []string{"http", "dns"}[rnd.Intn(2)]})
		}
	}
	return out
}

func cnpLabelSelector(ns string) (*metav1.LabelSelector, error) {
	if ns == "" {
		return &metav1.LabelSelector{}, nil
	}
	return &metav1.LabelSelector{MatchLabels: labels.Set{"ns": ns}}, nil
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
