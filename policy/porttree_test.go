package policy

import (
	"fmt"
	"math/rand"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/sluice-net/sluice/internal/nettest"
)

// randomPorts is a rule's ports: none (every port), or one to three of a
// single port, a range, a protocol alone or a named port, over TCP, UDP
// and SCTP, around the ports the trace probes.
func randomPorts(rng *rand.Rand) []networkingv1.NetworkPolicyPort {
	if rng.Intn(6) == 0 {
		return nil
	}
	protos := []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP}
	var out []networkingv1.NetworkPolicyPort
	for n := 1 + rng.Intn(3); n > 0; n-- {
		proto := protos[rng.Intn(len(protos))]
		p := networkingv1.NetworkPolicyPort{Protocol: &proto}
		switch rng.Intn(5) {
		case 0: // the protocol alone
		case 1:
			p.Port = ptr.To(intstr.FromString(fmt.Sprintf("serve-%d-%s", 80+rng.Intn(2), strings.ToLower(string(proto)))))
		case 2:
			lo := int32(78 + rng.Intn(5))
			p.Port, p.EndPort = ptr.To(intstr.FromInt32(lo)), ptr.To(lo+int32(rng.Intn(4)))
		default:
			p.Port = ptr.To(intstr.FromInt32(int32(78 + rng.Intn(8))))
		}
		out = append(out, p)
	}
	return out
}

func randomPeer(rng *rand.Rand) []networkingv1.NetworkPolicyPeer {
	if rng.Intn(4) == 0 {
		return nil
	}
	return []networkingv1.NetworkPolicyPeer{{
		NamespaceSelector: sel("ns", []string{"x", "y", "z"}[rng.Intn(3)]),
		PodSelector:       sel("pod", []string{"a", "b", "c"}[rng.Intn(3)]),
	}}
}

// TestPortTreeAgreesWithTheReference: dozens of random policies select the
// same pods, so their endpoints dispatch on ports; every pod pair, on
// every protocol and on ports around the policies' ports, gets the verdict
// of the reference evaluator.
func TestPortTreeAgreesWithTheReference(t *testing.T) {
	for seed := int64(1); seed <= 6; seed++ {
		rng := rand.New(rand.NewSource(seed))
		w := newWorld()
		if seed%2 == 0 {
			w = newWorld6()
		}
		var pols []*Policy
		for i := 0; i < 30; i++ {
			ing := networkingv1.NetworkPolicyIngressRule{From: randomPeer(rng), Ports: randomPorts(rng)}
			eg := networkingv1.NetworkPolicyEgressRule{To: randomPeer(rng), Ports: randomPorts(rng)}
			spec := networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "b"), Ingress: []networkingv1.NetworkPolicyIngressRule{ing}}
			if i%3 != 1 {
				spec.Egress = []networkingv1.NetworkPolicyEgressRule{eg}
				spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}
			}
			pols = append(pols, np([]string{"x", "y"}[i%2], fmt.Sprintf("p%d", i), spec))
		}
		rs := w.render(pols)
		if !hasChainPrefix(rs, chainPrefix+"TT-") || !hasChainPrefix(rs, chainPrefix+"FS-") {
			t.Fatalf("seed %d: no port tree was rendered", seed)
		}
		for from := range w.pods {
			for to := range w.pods {
				// ICMP has no ports: only rules for every port match it.
				for _, proto := range []Protocol{TCP, UDP, SCTP, "ICMP"} {
					for port := int32(77); port <= 86; port++ {
						p := &packet{in: vethOf(from), out: vethOf(to), src: w.ip(from), dst: w.ip(to), proto: proto, dport: port}
						want := Allowed(pols, w.ep(from), w.ep(to), proto, port)
						if got := forwardVerdict(t, rs, p); got != want {
							t.Errorf("seed %d: %s -> %s %s/%d: rules say %v, reference %v", seed, from, to, proto, port, got, want)
						}
					}
				}
			}
		}
	}
}

func hasChainPrefix(rs *Ruleset, prefix string) bool {
	for name := range rs.Chains {
		if strings.HasPrefix(name, prefix) {
			return true
		}
	}
	return false
}

// TestPortTreeKeepsConnectCostFlat: with 1,000 policies on ports of their
// own selecting a pod (the last also allowing x on every port), a new
// connection is matched against a few dozen rules through the port tree,
// against thousands through the plain list of jumps. The tracer counts
// the rules, as the kernel walks them.
func TestPortTreeKeepsConnectCostFlat(t *testing.T) {
	w := newWorld()
	tcp := corev1.ProtocolTCP
	var pols []*Policy
	for i := 0; i < 1000; i++ {
		spec := networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "b"), Ingress: []networkingv1.NetworkPolicyIngressRule{{
			From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", fmt.Sprintf("team-%d", i))}},
			Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: ptr.To(intstr.FromInt32(int32(10000 + i)))}},
		}}}
		if i == 999 {
			spec.Ingress = append(spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "x")}}})
		}
		pols = append(pols, np("y", fmt.Sprintf("bulk-%d", i), spec))
	}
	// walk traces x/a -> y/b on a port and returns the rules it was matched
	// against and whether it passed.
	walk := func(threshold int, port int32) (int, bool) {
		tr := &tracer{t: t, rs: w.renderWith(pols, threshold)}
		p := &packet{out: vethOf("y/b"), src: w.ip("x/a"), dst: w.ip("y/b"), proto: TCP, dport: port}
		v := tr.run(EndpointChain(vethOf("y/b"), false), p, 0)
		return tr.steps, v != verdictDrop
	}
	for _, port := range []int32{80, 10500} {
		tree, allowedTree := walk(0, port)
		list, allowedList := walk(1<<20, port)
		if !allowedTree || !allowedList {
			t.Errorf("port %d: x/a -> y/b denied (tree %v, list %v)", port, allowedTree, allowedList)
		}
		t.Logf("port %d: %d rules through the port tree, %d through the list of jumps", port, tree, list)
		if tree > 80 || list < 1000 {
			t.Errorf("port %d: %d rules through the port tree (want at most 80), %d through the list (want 1000 or more)", port, tree, list)
		}
	}
}

// TestPortTreeInTheKernel: a port tree loads into the kernel, reads back
// in iptables-save's form (a restarted agent rewrites nothing), and goes
// away with the policies that made it.
func TestPortTreeInTheKernel(t *testing.T) {
	n := nettest.NewNS(t)
	w := newWorld()
	var pols []*Policy
	for i := 0; i < 40; i++ {
		proto := []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP}[i%3]
		pp := networkingv1.NetworkPolicyPort{Protocol: &proto, Port: ptr.To(intstr.FromInt32(int32(1000 + i)))}
		if i%4 == 0 {
			pp.EndPort = ptr.To(int32(1000 + i + 7))
		}
		pols = append(pols, np("y", fmt.Sprintf("p%d", i), networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "b"),
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: sel("pod", "a")}}, Ports: []networkingv1.NetworkPolicyPort{pp}}}}))
	}
	nettest.Do(t, n, func() error {
		r, err := forwardingWriter()
		if err != nil {
			return err
		}
		rs := w.render(pols)
		if !hasChainPrefix(rs, chainPrefix+"TT-") {
			t.Fatal("no port tree was rendered")
		}
		if _, err := NewDataplane(r, false).Apply(rs); err != nil {
			return err
		}
		if st, err := NewDataplane(r, false).Apply(w.render(pols)); err != nil || st.ChainsWritten != 0 {
			t.Errorf("apply after restart rewrote %d chains (%v); the port tree's text differs from iptables-save", st.ChainsWritten, err)
		}
		if _, err := NewDataplane(r, false).Apply(w.render(nil)); err != nil {
			return err
		}
		for _, kind := range []string{"TT-", "TS-"} {
			if strings.Contains(save(t, nettest.Name(n)), chainPrefix+kind) {
				t.Errorf("%s chains remain after the policies went", kind)
			}
		}
		return nil
	})
}
