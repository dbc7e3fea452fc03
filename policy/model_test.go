package policy

import (
	"fmt"
	"net/netip"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

// The e2e netpol model: namespaces x, y, z with pods a, b, c, each serving
// TCP and UDP on 80 and 81 with named ports serve-80-tcp etc. The pods are
// dual-stack; ipv6 says which family the world's flows and rules use.
type world struct {
	pods map[string]*Pod
	nss  map[string]*Namespace
	ipv6 bool
}

// newWorld is the model over IPv4, newWorld6 the same over IPv6.
func newWorld() *world  { return newWorldOf(false) }
func newWorld6() *world { return newWorldOf(true) }

// worlds are the model in each family, for tests that hold in both.
func worlds() []*world { return []*world{newWorld(), newWorld6()} }

func newWorldOf(ipv6 bool) *world {
	w := &world{pods: map[string]*Pod{}, nss: map[string]*Namespace{}, ipv6: ipv6}
	i := 0
	for _, ns := range []string{"x", "y", "z"} {
		w.nss[ns] = &Namespace{Name: ns, Labels: labels.Set{"ns": ns}}
		for _, name := range []string{"a", "b", "c"} {
			i++
			w.pods[ns+"/"+name] = &Pod{
				Namespace: ns, Name: name, Labels: labels.Set{"pod": name},
				IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 244, byte(i), 2}), netip.MustParseAddr(fmt.Sprintf("fd00:10:244:%d::2", i))},
				NamedPorts: map[string]NamedPort{
					"serve-80-tcp": {TCP, 80}, "serve-80-udp": {UDP, 80},
					"serve-81-tcp": {TCP, 81}, "serve-81-udp": {UDP, 81},
				},
			}
		}
	}
	return w
}

func (w *world) ep(key string) Endpoint {
	p := w.pods[key]
	return Endpoint{Pod: p, Namespace: w.nss[p.Namespace], IP: w.ip(key)}
}

// ip is a pod's address in the world's family.
func (w *world) ip(key string) netip.Addr {
	if w.ipv6 {
		return w.pods[key].IPs[1]
	}
	return w.pods[key].IPs[0]
}

// family names the world's family, for subtests.
func (w *world) family() string {
	if w.ipv6 {
		return "ipv6"
	}
	return "ipv4"
}

// outside is an address outside the cluster: the lab's outside world.
func (w *world) outside() Endpoint {
	if w.ipv6 {
		return Endpoint{IP: netip.MustParseAddr("2001:db8::fe")}
	}
	return Endpoint{IP: netip.MustParseAddr("198.18.0.254")}
}

// podBlock is the ipBlock of every pod address of the world's family,
// except the /24 (/64) of the 5th pod, y/b.
func (w *world) podBlock() *networkingv1.IPBlock {
	if w.ipv6 {
		return &networkingv1.IPBlock{CIDR: "fd00:10:244::/48", Except: []string{"fd00:10:244:5::/64"}}
	}
	return &networkingv1.IPBlock{CIDR: "10.244.0.0/16", Except: []string{"10.244.5.0/24"}}
}

// table computes "from -> to" for every pod pair on one port.
func (w *world) table(pols []*Policy, proto Protocol, port int32) map[string]bool {
	t := map[string]bool{}
	for from := range w.pods {
		for to := range w.pods {
			t[from+"->"+to] = Allowed(pols, w.ep(from), w.ep(to), proto, port)
		}
	}
	return t
}

func np(ns, name string, spec networkingv1.NetworkPolicySpec) *Policy {
	return FromNetworkPolicy(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: spec})
}

func sel(kv ...string) *metav1.LabelSelector {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return &metav1.LabelSelector{MatchLabels: m}
}

func port(p int32, proto corev1.Protocol) networkingv1.NetworkPolicyPort {
	return networkingv1.NetworkPolicyPort{Protocol: &proto, Port: ptr.To(intstr.FromInt32(p))}
}

func namedPort(n string, proto corev1.Protocol) networkingv1.NetworkPolicyPort {
	return networkingv1.NetworkPolicyPort{Protocol: &proto, Port: ptr.To(intstr.FromString(n))}
}

// expect builds a truth table: everything allowed except the listed
// exceptions (or, with denyAll, everything denied except those allowed).
func (w *world) expect(defaultAllow bool, flips func(from, to string) bool) map[string]bool {
	t := map[string]bool{}
	for from := range w.pods {
		for to := range w.pods {
			// A pod always reaches itself.
			t[from+"->"+to] = from == to || defaultAllow != flips(from, to)
		}
	}
	return t
}

func diff(t *testing.T, name string, got, want map[string]bool) {
	t.Helper()
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s: %s allowed=%v, want %v", name, k, got[k], v)
		}
	}
}

func nsOf(key string) string  { return key[:1] }
func podOf(key string) string { return key[2:] }

type policyCase struct {
	name   string
	pols   []*Policy
	proto  Protocol
	port   int32
	expect map[string]bool
}

func TestTruthTables(t *testing.T) {
	for _, w := range worlds() {
		t.Run(w.family(), func(t *testing.T) {
			for _, c := range policyCases(w) {
				diff(t, c.name, w.table(c.pols, c.proto, c.port), c.expect)
			}
		})
	}
}

func policyCases(w *world) []policyCase {
	return []policyCase{
		{"no policy: all open", nil, TCP, 80, w.expect(true, func(_, _ string) bool { return false })},
		{"default deny ingress in x",
			[]*Policy{np("x", "deny", networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{}})}, TCP, 80,
			w.expect(true, func(_, to string) bool { return nsOf(to) == "x" })},
		{"default deny egress in x",
			[]*Policy{np("x", "deny", networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}})}, TCP, 80,
			w.expect(true, func(from, _ string) bool { return nsOf(from) == "x" })},
		{"x/a accepts pod=b of its own namespace only",
			[]*Policy{np("x", "allow-b", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"),
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: sel("pod", "b")}}}}})}, TCP, 80,
			w.expect(true, func(from, to string) bool { return to == "x/a" && from != "x/b" })},
		{"namespaceSelector AND podSelector in one peer",
			[]*Policy{np("x", "and", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"),
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "y"), PodSelector: sel("pod", "b")}}}}})}, TCP, 80,
			w.expect(true, func(from, to string) bool { return to == "x/a" && from != "y/b" })},
		{"namespaceSelector OR podSelector in two peers",
			[]*Policy{np("x", "or", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"),
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "y")}, {PodSelector: sel("pod", "b")}}}}})}, TCP, 80,
			w.expect(true, func(from, to string) bool { return to == "x/a" && nsOf(from) != "y" && from != "x/b" })},
		{"empty ingress rule allows everything",
			[]*Policy{np("x", "all", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{}}})}, TCP, 80,
			w.expect(true, func(_, _ string) bool { return false })},
		{"egress-only spec without policyTypes isolates both directions",
			[]*Policy{np("x", "egress", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"),
				Egress: []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "z")}}}}})}, TCP, 80,
			w.expect(true, func(from, to string) bool { return to == "x/a" || (from == "x/a" && nsOf(to) != "z") })},
		{"ipBlock with except",
			[]*Policy{np("x", "block", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"),
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{IPBlock: w.podBlock()}}}}})}, TCP, 80,
			// y/b is the 5th pod: 10.244.5.2 and fd00:10:244:5::2.
			w.expect(true, func(from, to string) bool { return to == "x/a" && from == "y/b" })},
		{"numeric port: 80 allowed",
			[]*Policy{np("x", "p80", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{port(80, corev1.ProtocolTCP)}}}})}, TCP, 80,
			w.expect(true, func(_, _ string) bool { return false })},
		{"numeric port: 81 denied",
			[]*Policy{np("x", "p80", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{port(80, corev1.ProtocolTCP)}}}})}, TCP, 81,
			w.expect(true, func(_, to string) bool { return nsOf(to) == "x" })},
		{"numeric port: UDP 80 denied by a TCP rule",
			[]*Policy{np("x", "p80", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{port(80, corev1.ProtocolTCP)}}}})}, UDP, 80,
			w.expect(true, func(_, to string) bool { return nsOf(to) == "x" })},
		{"named port resolved on the destination pod",
			[]*Policy{np("x", "named", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{namedPort("serve-81-udp", corev1.ProtocolUDP)}}}})}, UDP, 81,
			w.expect(true, func(_, _ string) bool { return false })},
		{"named port does not open the other port",
			[]*Policy{np("x", "named", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{namedPort("serve-81-udp", corev1.ProtocolUDP)}}}})}, UDP, 80,
			w.expect(true, func(_, to string) bool { return nsOf(to) == "x" })},
		{"endPort range",
			[]*Policy{np("x", "range", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Protocol: ptr.To(corev1.ProtocolTCP), Port: ptr.To(intstr.FromInt32(79)), EndPort: ptr.To[int32](80)}}}}})}, TCP, 80,
			w.expect(true, func(_, _ string) bool { return false })},
		{"policies add up",
			[]*Policy{
				np("x", "from-b", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: sel("pod", "b")}}}}}),
				np("x", "from-c", networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: sel("pod", "c")}}}}}),
			}, TCP, 80,
			w.expect(true, func(from, to string) bool { return nsOf(to) == "x" && !(nsOf(from) == "x" && podOf(from) != "a") })},
		{"a broken policy fails closed",
			[]*Policy{np("x", "broken", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"),
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "pod", Operator: "Bogus"}}}}}}}})}, TCP, 80,
			w.expect(true, func(_, to string) bool { return to == "x/a" })},
	}
}

func TestOutsideWorld(t *testing.T) {
	w := newWorld()
	outside := Endpoint{IP: netip.MustParseAddr("198.18.0.254")}
	egress := np("x", "to-world", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"), PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
		Egress: []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "198.18.0.0/24"}}}}}})
	if !Allowed([]*Policy{egress}, w.ep("x/a"), outside, TCP, 8080) {
		t.Error("egress to an allowed ipBlock denied")
	}
	if Allowed([]*Policy{egress}, w.ep("x/a"), w.ep("y/a"), TCP, 80) {
		t.Error("egress to a pod outside the ipBlock allowed")
	}
	named := np("x", "named-out", networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
		Egress: []networkingv1.NetworkPolicyEgressRule{{Ports: []networkingv1.NetworkPolicyPort{namedPort("serve-80-tcp", corev1.ProtocolTCP)}}}})
	if Allowed([]*Policy{named}, w.ep("x/b"), outside, TCP, 80) {
		t.Error("a named port matched an address that is not a pod")
	}
	if !Allowed([]*Policy{named}, w.ep("x/b"), w.ep("z/c"), TCP, 80) {
		t.Error("egress to a pod's named port denied")
	}
}

func TestConvertErrors(t *testing.T) {
	cases := []networkingv1.NetworkPolicySpec{
		{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "nope"}}}}}},
		{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Protocol: ptr.To(corev1.Protocol("ICMP"))}}}}},
		{Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: ptr.To(intstr.FromInt32(90)), EndPort: ptr.To[int32](80)}}}}},
		{Egress: []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{}}}}},
	}
	for i, spec := range cases {
		p := np("x", fmt.Sprint("bad", i), spec)
		if p.Broken == "" {
			t.Errorf("case %d: accepted %+v", i, spec)
		}
	}
}
