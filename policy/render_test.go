package policy

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/sluice-net/sluice/internal/contract"
)

func vethOf(key string) string {
	h := shortHash(key)
	return "sl" + h[:11]
}

func (w *world) render(pols []*Policy) *Ruleset { return w.renderWith(pols, 0) }

// renderWith renders with a port tree threshold (0: the default).
func (w *world) renderWith(pols []*Policy, portTreeThreshold int) *Ruleset {
	m := map[string]*Policy{}
	for _, p := range pols {
		m[p.Key] = p
	}
	var eps []LocalEndpoint
	var pods []*Pod
	keys := make([]string, 0, len(w.pods))
	for k := range w.pods {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		pod := w.pods[k]
		pods = append(pods, pod)
		in, out := Selecting(m, pod, nil)
		eps = append(eps, LocalEndpoint{Pod: pod, HostVeth: vethOf(k), Ingress: in, Egress: out})
	}
	r := &Renderer{IPv6: w.ipv6, AcceptMark: 0x10000, PortTreeThreshold: portTreeThreshold}
	return r.Render(m, eps, pods, w.nss)
}

// forwardVerdict plays package forward's chain: the sender's egress, then
// the receiver's ingress.
func forwardVerdict(t *testing.T, rs *Ruleset, p *packet) bool {
	if strings.HasPrefix(p.in, "sl") {
		tr := &tracer{t: t, rs: rs}
		if tr.run(contract.FromPodChain, p, 0) == verdictDrop {
			return false
		}
	}
	if strings.HasPrefix(p.out, "sl") {
		tr := &tracer{t: t, rs: rs}
		if tr.run(contract.ToPodChain, p, 0) == verdictDrop {
			return false
		}
	}
	return true
}

// TestRenderedRulesAgreeWithTheReference traces every pod pair, on both
// ports and protocols, through the rendered rules of every truth-table
// case, in each family, and compares with the reference semantics.
// With a port tree threshold of 1, every endpoint that two policies select
// dispatches on ports, so the same truth tables check the trees.
func TestRenderedRulesAgreeWithTheReference(t *testing.T) {
	for _, w := range worlds() {
		for _, threshold := range []int{0, 1} {
			t.Run(fmt.Sprintf("%s/port-tree-above-%d", w.family(), threshold), func(t *testing.T) { agreeWithTheReference(t, w, threshold) })
		}
	}
}

func agreeWithTheReference(t *testing.T, w *world, portTreeThreshold int) {
	outside := w.outside()
	for _, c := range policyCases(w) {
		rs := w.renderWith(c.pols, portTreeThreshold)
		for from := range w.pods {
			for to := range w.pods {
				// from == to is the hairpin: the pod reaching itself
				// through its own Service, back out of its own veth
				// after kube-proxy's DNAT.
				for _, proto := range []Protocol{TCP, UDP} {
					for _, port := range []int32{80, 81} {
						p := &packet{in: vethOf(from), out: vethOf(to), src: w.ip(from), dst: w.ip(to), proto: proto, dport: port}
						want := Allowed(c.pols, w.ep(from), w.ep(to), proto, port)
						if got := forwardVerdict(t, rs, p); got != want {
							t.Errorf("%s: %s -> %s %s/%d: rules say %v, reference %v", c.name, from, to, proto, port, got, want)
						}
					}
				}
			}
			// To and from the outside world.
			p := &packet{in: vethOf(from), dst: outside.IP, src: w.ip(from), proto: TCP, dport: 8080}
			if got, want := forwardVerdict(t, rs, p), Allowed(c.pols, w.ep(from), outside, TCP, 8080); got != want {
				t.Errorf("%s: %s -> outside: rules say %v, reference %v", c.name, from, got, want)
			}
			p = &packet{out: vethOf(from), src: outside.IP, dst: w.ip(from), proto: TCP, dport: 80}
			if got, want := forwardVerdict(t, rs, p), Allowed(c.pols, outside, w.ep(from), TCP, 80); got != want {
				t.Errorf("%s: outside -> %s: rules say %v, reference %v", c.name, from, got, want)
			}
		}
	}
}

// TestConntrackStateDecidesBeforePolicy: whatever the policies, a packet
// of a connection conntrack knows (ESTABLISHED, RELATED) passes the
// endpoint chains, and one it calls INVALID is dropped, in both families
// and both directions. Cutting a flow that a new policy denies is the
// conntrack cutter's work, not the rules'.
func TestConntrackStateDecidesBeforePolicy(t *testing.T) {
	for _, w := range worlds() {
		t.Run(w.family(), func(t *testing.T) {
			outside := w.outside()
			for _, c := range policyCases(w) {
				rs := w.render(c.pols)
				for from := range w.pods {
					flows := []*packet{
						{in: vethOf(from), dst: outside.IP, src: w.ip(from), proto: TCP, dport: 8080},
						{out: vethOf(from), src: outside.IP, dst: w.ip(from), proto: UDP, dport: 81},
					}
					for to := range w.pods {
						if from != to {
							flows = append(flows, &packet{in: vethOf(from), out: vethOf(to), src: w.ip(from), dst: w.ip(to), proto: c.proto, dport: c.port})
						}
					}
					for _, p := range flows {
						for state, want := range map[string]bool{"ESTABLISHED": true, "RELATED": true, "INVALID": false} {
							p.state = state
							if got := forwardVerdict(t, rs, p); got != want {
								t.Errorf("%s: %s %s -> %s %s/%d: rules say %v, want %v", c.name, state, p.src, p.dst, p.proto, p.dport, got, want)
							}
						}
					}
				}
			}
		})
	}
}

func TestUnknownSluiceInterfaceIsDropped(t *testing.T) {
	w := newWorld()
	rs := w.render(nil)
	for _, veth := range []string{"sl00000000000", "slfffffffffff"} {
		if forwardVerdict(t, rs, &packet{in: veth, src: netip.MustParseAddr("10.244.99.2"), dst: netip.MustParseAddr("10.244.1.2"), proto: TCP, dport: 80}) {
			t.Errorf("traffic from unprogrammed %s forwarded", veth)
		}
		if forwardVerdict(t, rs, &packet{out: veth, src: netip.MustParseAddr("10.244.1.2"), dst: netip.MustParseAddr("10.244.99.2"), proto: TCP, dport: 80}) {
			t.Errorf("traffic to unprogrammed %s forwarded", veth)
		}
	}
}

// TestRulesPerEndpointStayFlat: an endpoint's chain depends on the
// policies selecting it, not on the number of pods.
func TestRulesPerEndpointStayFlat(t *testing.T) {
	pol := np("x", "from-b", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
		From: []networkingv1.NetworkPolicyPeer{{PodSelector: sel("pod", "b")}}, Ports: []networkingv1.NetworkPolicyPort{port(80, corev1.ProtocolTCP)}}}})
	count := func(n int) (endpointRules, policyRules int) {
		pols := map[string]*Policy{pol.Key: pol}
		var pods []*Pod
		for i := 0; i < n; i++ {
			pods = append(pods, &Pod{Namespace: "x", Name: fmt.Sprint(i), Labels: labels.Set{"pod": []string{"a", "b"}[i%2]},
				IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 244, byte(i / 250), byte(i%250 + 2)})}})
		}
		local := pods[0]
		in, out := Selecting(pols, local, nil)
		rs := (&Renderer{AcceptMark: 0x10000}).Render(pols, []LocalEndpoint{{Pod: local, HostVeth: "sl0123456789a", Ingress: in, Egress: out}}, pods, map[string]*Namespace{"x": {Name: "x"}})
		return len(rs.Chains[EndpointChain("sl0123456789a", false)]), len(rs.Chains[PolicyChain(pol.Key, false)])
	}
	e100, p100 := count(100)
	e5000, p5000 := count(5000)
	if e100 != e5000 || p100 != p5000 {
		t.Errorf("rules grow with pods: endpoint %d -> %d, policy %d -> %d", e100, e5000, p100, p5000)
	}
}

func TestRenderGolden(t *testing.T) {
	pol := np("x", "web", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"), Ingress: []networkingv1.NetworkPolicyIngressRule{{
		From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "y")}, {IPBlock: &networkingv1.IPBlock{CIDR: "192.168.0.0/16", Except: []string{"192.168.1.0/24"}}}},
		Ports: []networkingv1.NetworkPolicyPort{port(80, corev1.ProtocolTCP), {Protocol: ptr.To(corev1.ProtocolUDP), Port: ptr.To(intstr.FromInt32(1000)), EndPort: ptr.To[int32](2000)}},
	}}})
	w := newWorld()
	rs := w.render([]*Policy{pol})
	chain := PolicyChain("x/web", false)
	got := strings.Join(rs.Chains[chain], "\n")
	S, C := (&Renderer{}).selectorSetName(pol.IngressRules[0].Src.Peers[0].Pods), (&Renderer{}).cidrSetName(&pol.IngressRules[0].Src.Peers[1])
	want := strings.Join([]string{
		"-A " + chain + " -p tcp -m set --match-set " + S + " src -m tcp --dport 80 -j MARK --set-xmark 0x10000/0x10000",
		"-A " + chain + " -p udp -m set --match-set " + S + " src -m udp --dport 1000:2000 -j MARK --set-xmark 0x10000/0x10000",
		"-A " + chain + " -p tcp -m set --match-set " + C + " src -m tcp --dport 80 -j MARK --set-xmark 0x10000/0x10000",
		"-A " + chain + " -p udp -m set --match-set " + C + " src -m udp --dport 1000:2000 -j MARK --set-xmark 0x10000/0x10000",
		"-A " + chain + " -m mark --mark 0x10000/0x10000 -j RETURN",
	}, "\n")
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
	if s := rs.Sets[C]; s == nil || strings.Join(s.Entries, ",") != "192.168.0.0/16,192.168.1.0/24 nomatch" {
		t.Errorf("ipBlock set: %+v", s)
	}
	if s := rs.Sets[S]; s == nil || len(s.Entries) != 3 {
		t.Errorf("namespace y selector set: %+v", s)
	}
	for name := range rs.Chains {
		if len(name) > 28 {
			t.Errorf("chain name %s is longer than iptables allows", name)
		}
	}
	for name := range rs.Sets {
		if len(name) > 31 {
			t.Errorf("set name %s is longer than ipset allows", name)
		}
	}
}
