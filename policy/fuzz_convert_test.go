package policy

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
)

// FuzzFromNetworkPolicy feeds random networking/v1 policies to the
// conversion, as the API can hand Sluice anything its validation lets
// through (and objects from older or patched API servers). The input is
// either the JSON of a NetworkPolicySpec (the seeds below, readable) or
// bytes that fuzzDecoder turns into a spec. For every input:
//
//   - FromNetworkPolicy does not panic;
//   - a Broken policy names the field ("spec....") in printable text, and
//     fails closed: it selects at least the pods the object selects, in at
//     least the directions it declares, and allows them nothing there;
//   - a policy that converts is, by Allowed, exactly what the API text
//     says (specAllows reads the object directly, with package net);
//   - the rules rendered for both families agree with Allowed on every
//     packet the tracer walks: pod to pod, and to and from addresses on
//     both sides of every ipBlock boundary, on each port and protocol; and
//     every ipset entry is one the kernel accepts.
func FuzzFromNetworkPolicy(f *testing.F) {
	for _, s := range fuzzSeeds {
		f.Add([]byte(s))
	}
	// Byte-decoded seeds: a few fixed patterns that reach the decoder's
	// garbage branches (an IntOrString of no known type, for one).
	f.Add([]byte{})
	f.Add([]byte{0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f})
	f.Add([]byte(strings.Repeat("\xff\x07\x13", 40)))
	f.Add([]byte(strings.Repeat("\x03\x05\x02\x06\x04\x01", 30)))
	w := newFuzzWorld()
	f.Fuzz(func(t *testing.T, data []byte) {
		spec, ok := specFromJSON(data)
		if !ok {
			spec = (&fuzzDecoder{b: data}).spec()
		}
		boundSpec(&spec)
		checkConversion(t, w, &networkingv1.NetworkPolicy{
			ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "fuzz"}, Spec: spec})
	})
}

// The seed corpus: the ipBlock matrix of issue #10, selectors and ports the
// API server would refuse, and the inputs the fuzzer found.
var fuzzSeeds = []string{
	// ipBlock, both families.
	`{"podSelector":{},"policyTypes":["Egress"],"egress":[{"to":[{"ipBlock":{"cidr":"0.0.0.0/0"}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"0.0.0.0/0"}}]}]}`,
	`{"podSelector":{},"policyTypes":["Ingress","Egress"],"egress":[{"to":[{"ipBlock":{"cidr":"::/0"}}]}],"ingress":[{"from":[{"ipBlock":{"cidr":"::/0"}}]}]}`,
	`{"podSelector":{},"egress":[{"to":[{"ipBlock":{"cidr":"0.0.0.0/0","except":["10.244.2.0/24","198.18.0.0/15"]}}]}]}`,
	`{"podSelector":{},"egress":[{"to":[{"ipBlock":{"cidr":"::/0","except":["fd00:10:244:2::/64"]}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.2.2/32"}},{"ipBlock":{"cidr":"fd00:10:244:2::2/128"}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.2.0/24","except":["10.244.2.0/24"]}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.2.2/32","except":["10.244.2.2/32"]}},{"podSelector":{"matchLabels":{"pod":"b"}}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"fd00:10:244::/48","except":["fd00:10:244::/48"]}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.2.0/24","except":["10.244.0.0/16"]}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.0.0/16","except":["0.0.0.0/0"]}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.0.0/16","except":["10.244.0.0/20","10.244.2.0/24","10.244.2.2/32","10.244.2.0/24"]}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.0.0/16","except":["10.245.0.0/16","fd00::/8","10.0.0.0/8"]}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.2.77/16","except":["10.244.3.9/24"]}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.1.0/24"}},{"ipBlock":{"cidr":"10.244.1.0/25","except":["10.244.1.2/32"]}},{"ipBlock":{"cidr":"fd00:10:244:1::/64"}}]}]}`,
	`{"podSelector":{},"egress":[{"to":[{"ipBlock":{"cidr":"198.18.0.0/31"}},{"ipBlock":{"cidr":"2001:db8::/127"}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"nope"}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0"}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0/33"}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":""}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"fe80::1%eth0/64"}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0/8","except":["garbage"]}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0/8","except":[""]}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"::ffff:10.244.0.0/112"}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.0.0/16","except":["::ffff:10.244.2.0/120"]}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.0.0/16"},"podSelector":{}}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"ipBlock":{"cidr":"10.244.0.0/16"},"namespaceSelector":{}}]}]}`,
	// Selectors.
	`{"podSelector":{"matchLabels":{"pod":"a"}},"ingress":[{"from":[{"podSelector":{"matchLabels":{"pod":"b"}},"namespaceSelector":{"matchLabels":{"ns":"y"}}}]}]}`,
	`{"podSelector":{"matchExpressions":[{"key":"pod","operator":"In","values":["a","c"]}]},"ingress":[{"from":[{"namespaceSelector":{"matchExpressions":[{"key":"ns","operator":"NotIn","values":["x"]}]}}]}]}`,
	`{"podSelector":{"matchExpressions":[{"key":"app","operator":"Exists"}]},"egress":[{"to":[{"podSelector":{"matchExpressions":[{"key":"app","operator":"DoesNotExist"}]}}]}]}`,
	`{"podSelector":{"matchExpressions":[{"key":"pod","operator":"Bogus"}]},"ingress":[{}]}`,
	`{"podSelector":{"matchExpressions":[{"key":"pod","operator":"In","values":[]}]},"policyTypes":["Egress"],"egress":[{}]}`,
	`{"podSelector":{"matchExpressions":[{"key":"pod","operator":"Exists","values":["a"]}]}}`,
	`{"podSelector":{"matchLabels":{"bad key!":"a"}},"ingress":[{}]}`,
	`{"podSelector":{"matchLabels":{"pod":"bad value!"}},"ingress":[{}]}`,
	`{"podSelector":{"matchLabels":{"":""}},"ingress":[{}]}`,
	`{"podSelector":{},"ingress":[{"from":[{"podSelector":{"matchExpressions":[{"key":"pod","operator":"in","values":["a"]}]}}]}]}`,
	`{"podSelector":{},"egress":[{"to":[{"namespaceSelector":{"matchLabels":{"ns":"-y"}}}]}]}`,
	`{"podSelector":{},"egress":[{"to":[{}]}]}`,
	`{"podSelector":{},"ingress":[{"from":[]}],"egress":[{"to":[],"ports":[]}]}`,
	// policyTypes.
	`{"podSelector":{},"policyTypes":["Bogus"]}`,
	`{"podSelector":{},"policyTypes":["Egress","Bogus"],"egress":[{}]}`,
	`{"podSelector":{},"policyTypes":[""]}`,
	`{"podSelector":{},"policyTypes":["ingress"],"ingress":[{}]}`,
	`{"podSelector":{"matchLabels":{"pod":"a"}},"policyTypes":["Egress"],"ingress":[{"from":[{"ipBlock":{"cidr":"bad"}}]}]}`,
	// Ports.
	`{"podSelector":{},"ingress":[{"ports":[{"port":80},{"protocol":"UDP","port":81},{"protocol":"SCTP","port":80}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"protocol":"ICMP"}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"protocol":""}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"protocol":"tcp","port":80}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":0}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":-1}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":65536}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":65535},{"port":1}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":"serve-80-tcp"},{"protocol":"UDP","port":"serve-81-udp"},{"protocol":"SCTP","port":"serve-80-sctp"}]}]}`,
	`{"podSelector":{},"egress":[{"ports":[{"port":"http"}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":""}]}]}`,
	`{"podSelector":{},"egress":[{"ports":[{"port":""}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":"80"}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":79,"endPort":81},{"protocol":"UDP","port":80,"endPort":80}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":81,"endPort":80}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":80,"endPort":65536}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"endPort":80}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":"http","endPort":8080}]}]}`,
	`{"podSelector":{},"ingress":[{"ports":[{"port":1,"endPort":65535}]}]}`,
	// Everything together, egress and ingress in one object.
	`{"podSelector":{"matchLabels":{"pod":"a"}},"policyTypes":["Ingress","Egress"],"ingress":[{"from":[{"namespaceSelector":{"matchLabels":{"ns":"y"}}},{"ipBlock":{"cidr":"10.244.0.0/16","except":["10.244.1.0/24"]}},{"ipBlock":{"cidr":"fd00:10:244::/48","except":["fd00:10:244:1::/64"]}}],"ports":[{"port":80},{"protocol":"UDP","port":"serve-81-udp"}]}],"egress":[{"to":[{"podSelector":{}}],"ports":[{"protocol":"UDP","port":53}]},{"to":[{"ipBlock":{"cidr":"198.18.0.0/24"}}]}]}`,
}

// boundSpec trims a spec to a few rules, peers, ports and excepts each.
// More add rules, not shapes: the mutator copies JSON arrays into hundreds
// of entries, whose peers times ports rules the tracer then walks for
// every flow, and the fuzzer stalls on them.
func boundSpec(s *networkingv1.NetworkPolicySpec) {
	const n = 6
	trim := func(peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort) ([]networkingv1.NetworkPolicyPeer, []networkingv1.NetworkPolicyPort) {
		peers, ports = peers[:min(len(peers), n)], ports[:min(len(ports), n)]
		for _, p := range peers {
			if p.IPBlock != nil {
				p.IPBlock.Except = p.IPBlock.Except[:min(len(p.IPBlock.Except), n)]
			}
		}
		return peers, ports
	}
	s.PolicyTypes = s.PolicyTypes[:min(len(s.PolicyTypes), n)]
	s.Ingress, s.Egress = s.Ingress[:min(len(s.Ingress), 3)], s.Egress[:min(len(s.Egress), 3)]
	for i := range s.Ingress {
		s.Ingress[i].From, s.Ingress[i].Ports = trim(s.Ingress[i].From, s.Ingress[i].Ports)
	}
	for i := range s.Egress {
		s.Egress[i].To, s.Egress[i].Ports = trim(s.Egress[i].To, s.Egress[i].Ports)
	}
}

func specFromJSON(data []byte) (networkingv1.NetworkPolicySpec, bool) {
	var spec networkingv1.NetworkPolicySpec
	if len(data) == 0 || data[0] != '{' {
		return spec, false
	}
	if err := json.Unmarshal(data, &spec); err != nil {
		return spec, false
	}
	return spec, true
}

// fuzzWorld is a small dual-stack cluster: two namespaces with two pods
// each, and a third with one IPv4-only and one IPv6-only pod. Two pods
// share an IPv4 /24 and an IPv6 /64, so ipBlock boundaries fall between
// pods.
type fuzzWorld struct {
	pods  []*Pod
	nss   map[string]*Namespace
	veths map[*Pod]string
}

func newFuzzWorld() *fuzzWorld {
	w := &fuzzWorld{nss: map[string]*Namespace{
		"x": {Name: "x", Labels: labels.Set{"ns": "x"}},
		"y": {Name: "y", Labels: labels.Set{"ns": "y", "team": "blue"}},
		"z": {Name: "z", Labels: labels.Set{"ns": "z"}},
	}, veths: map[*Pod]string{}}
	serve := map[string]NamedPort{
		"serve-80-tcp": {TCP, 80}, "serve-80-udp": {UDP, 80}, "serve-81-tcp": {TCP, 81},
		"serve-81-udp": {UDP, 81}, "serve-80-sctp": {SCTP, 80}, "http": {TCP, 8080},
	}
	add := func(ns, name string, lbl labels.Set, ports map[string]NamedPort, ips ...string) {
		p := &Pod{Namespace: ns, Name: name, Labels: lbl, NamedPorts: ports}
		for _, ip := range ips {
			p.IPs = append(p.IPs, netip.MustParseAddr(ip))
		}
		w.pods = append(w.pods, p)
		w.veths[p] = vethOf(ns + "/" + name)
	}
	add("x", "a", labels.Set{"pod": "a", "app": "web"}, serve, "10.244.1.2", "fd00:10:244:1::2")
	add("x", "b", labels.Set{"pod": "b"}, map[string]NamedPort{"http": {TCP, 80}}, "10.244.1.3", "fd00:10:244:1::3")
	add("y", "a", labels.Set{"pod": "a"}, serve, "10.244.2.2", "fd00:10:244:2::2")
	add("y", "c", labels.Set{"pod": "c", "app": "db"}, nil, "10.244.2.255", "fd00:10:244:2:ffff:ffff:ffff:ffff")
	add("z", "a", labels.Set{"pod": "a"}, serve, "10.244.4.2")
	add("z", "b", labels.Set{"pod": "b"}, serve, "fd00:10:244:5::2")
	return w
}

func (w *fuzzWorld) ip(p *Pod, ipv6 bool) (netip.Addr, bool) {
	for _, a := range p.IPs {
		if a.Is6() == ipv6 {
			return a, true
		}
	}
	return netip.Addr{}, false
}

func (w *fuzzWorld) isPodIP(a netip.Addr) bool {
	for _, p := range w.pods {
		if slices.Contains(p.IPs, a) {
			return true
		}
	}
	return false
}

func (w *fuzzWorld) veth(p *Pod) string { return w.veths[p] }

func (w *fuzzWorld) render(p *Policy, ipv6 bool) *Ruleset {
	m := map[string]*Policy{p.Key: p}
	var eps []LocalEndpoint
	for _, pod := range w.pods {
		in, out := Selecting(m, pod, nil)
		eps = append(eps, LocalEndpoint{Pod: pod, HostVeth: w.veth(pod), Ingress: in, Egress: out})
	}
	return (&Renderer{IPv6: ipv6, AcceptMark: 0x10000}).Render(m, eps, w.pods, w.nss)
}

// flow is one connection the checks decide three ways: by Allowed, by the
// API text, and by the rendered rules.
type flow struct {
	src, dst Endpoint
	pkt      packet
}

func (fl *flow) String() string {
	side := func(e Endpoint) string {
		if e.Pod != nil {
			return fmt.Sprintf("%s/%s(%s)", e.Pod.Namespace, e.Pod.Name, e.IP)
		}
		return e.IP.String()
	}
	return fmt.Sprintf("%s -> %s %s/%d", side(fl.src), side(fl.dst), fl.pkt.proto, fl.pkt.dport)
}

// flows lists, for one family, every pod pair and every pod with every
// probe address, both ways, on each probe port of each protocol.
func (w *fuzzWorld) flows(ipv6 bool, protos []Protocol, ports []int32, outside []netip.Addr) []flow {
	var out []flow
	ep := func(p *Pod, a netip.Addr) Endpoint { return Endpoint{Pod: p, Namespace: w.nss[p.Namespace], IP: a} }
	for _, proto := range protos {
		for _, port := range ports {
			for _, from := range w.pods {
				fa, ok := w.ip(from, ipv6)
				if !ok {
					continue
				}
				for _, to := range w.pods {
					ta, ok := w.ip(to, ipv6)
					if !ok || to == from {
						continue // a pod's traffic to itself never reaches the host
					}
					out = append(out, flow{ep(from, fa), ep(to, ta), packet{in: w.veth(from), out: w.veth(to), src: fa, dst: ta, proto: proto, dport: port}})
				}
				for _, a := range outside {
					if a.Is6() != ipv6 {
						continue
					}
					out = append(out,
						flow{ep(from, fa), Endpoint{IP: a}, packet{in: w.veth(from), src: fa, dst: a, proto: proto, dport: port}},
						flow{Endpoint{IP: a}, ep(from, fa), packet{out: w.veth(from), src: a, dst: fa, proto: proto, dport: port}})
				}
			}
		}
	}
	return out
}

// probes picks the protocols, ports and outside addresses worth asking
// about: fixed ones, and each side of every port range and ipBlock
// boundary the object names (parsed here, not by the conversion under
// test). Every flow costs two walks of the tracer, so there are few.
func (w *fuzzWorld) probes(spec *networkingv1.NetworkPolicySpec) ([]Protocol, []int32, []netip.Addr) {
	protos := []Protocol{TCP, UDP}
	ports := []int32{80, 81, 8080}
	addrs := []netip.Addr{netip.MustParseAddr("198.18.0.254"), netip.MustParseAddr("2001:db8::fe")}
	addPort := func(n int32) {
		if n >= 1 && n <= 65535 && !slices.Contains(ports, n) && len(ports) < 8 {
			ports = append(ports, n)
		}
	}
	addBlock := func(s string) {
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			return
		}
		pfx = pfx.Masked()
		first := pfx.Addr()
		last := lastAddr(pfx)
		for _, a := range []netip.Addr{first, last, first.Prev(), last.Next()} {
			a = a.Unmap()
			if a.IsValid() && !w.isPodIP(a) && !slices.Contains(addrs, a) && len(addrs) < 12 {
				addrs = append(addrs, a)
			}
		}
	}
	walk := func(peers []networkingv1.NetworkPolicyPeer, pts []networkingv1.NetworkPolicyPort) {
		for _, p := range peers {
			if p.IPBlock != nil {
				addBlock(p.IPBlock.CIDR)
				for _, e := range p.IPBlock.Except {
					addBlock(e)
				}
			}
		}
		for _, pt := range pts {
			if pt.Protocol != nil && *pt.Protocol == corev1.ProtocolSCTP && !slices.Contains(protos, SCTP) {
				protos = append(protos, SCTP)
			}
			if pt.Port != nil && pt.Port.Type == intstr.Int {
				addPort(pt.Port.IntVal - 1)
				addPort(pt.Port.IntVal)
				addPort(pt.Port.IntVal + 1)
			}
			if pt.EndPort != nil {
				addPort(*pt.EndPort)
				addPort(*pt.EndPort + 1)
			}
		}
	}
	for _, r := range spec.Ingress {
		walk(r.From, r.Ports)
	}
	for _, r := range spec.Egress {
		walk(r.To, r.Ports)
	}
	return protos, ports, addrs
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

func checkConversion(t *testing.T, w *fuzzWorld, np *networkingv1.NetworkPolicy) {
	t.Helper()
	p := FromNetworkPolicy(np)
	if p == nil {
		t.Fatal("FromNetworkPolicy returned nil")
	}
	if p.Key != "x/fuzz" || p.Namespace != "x" || p.PodSelector == nil {
		t.Fatalf("key %q, namespace %q, selector %v", p.Key, p.Namespace, p.PodSelector)
	}
	spec := &np.Spec
	if p.Broken != "" {
		checkBroken(t, w, np, p)
	}
	pols := []*Policy{p}
	protos, ports, outside := w.probes(spec)
	for _, ipv6 := range []bool{false, true} {
		flows := w.flows(ipv6, protos, ports, outside)
		for i := range flows {
			fl := &flows[i]
			got := Allowed(pols, fl.src, fl.dst, fl.pkt.proto, fl.pkt.dport)
			if p.Broken == "" {
				if want := specAllows(np, fl.src, fl.dst, fl.pkt.proto, fl.pkt.dport); got != want {
					t.Fatalf("%s: model allows=%v, the API text %v\nspec %s\nmodel %+v", fl, got, want, specJSON(spec), p)
				}
			}
		}
		rs := w.render(p, ipv6)
		checkSets(t, rs, ipv6, spec)
		for i := range flows {
			fl := &flows[i]
			want := Allowed(pols, fl.src, fl.dst, fl.pkt.proto, fl.pkt.dport)
			if got := forwardVerdict(t, rs, &fl.pkt); got != want {
				t.Fatalf("IPv6=%v %s: rules allow=%v, reference %v\nspec %s\nchains %v\nsets %v", ipv6, fl, got, want, specJSON(spec), rs.Chains[PolicyChain(p.Key, fl.src.Pod == nil)], setsString(rs))
			}
		}
	}
}

// checkBroken: a policy that could not be converted says which field and
// why, and fails closed.
func checkBroken(t *testing.T, w *fuzzWorld, np *networkingv1.NetworkPolicy, p *Policy) {
	t.Helper()
	msg := p.Broken
	field, _, _ := strings.Cut(msg, ":")
	if !strings.HasPrefix(field, "spec.") || len(msg) < len(field)+3 {
		t.Fatalf("Broken %q does not name the field (spec....: why)", msg)
	}
	if !utf8.ValidString(msg) || strings.IndexFunc(msg, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0 {
		t.Fatalf("Broken %q is not printable text", msg)
	}
	if len(p.IngressRules)+len(p.EgressRules) != 0 {
		t.Fatalf("Broken policy keeps rules: %+v", p)
	}
	// At least the directions the object declares.
	wantIn, wantEg := specIsolates(&np.Spec)
	if (wantIn && !p.Ingress) || (wantEg && !p.Egress) || !(p.Ingress || p.Egress) {
		t.Fatalf("Broken policy isolates ingress=%v egress=%v, the object ingress=%v egress=%v (%s)", p.Ingress, p.Egress, wantIn, wantEg, msg)
	}
	// At least the pods the object selects, when that is known.
	sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
	for _, pod := range w.pods {
		if pod.Namespace == np.Namespace && (err != nil || sel.Matches(pod.Labels)) && !p.Selects(pod, nil) {
			t.Fatalf("Broken policy does not select %s/%s (%s)", pod.Namespace, pod.Name, msg)
		}
	}
	// And allows those pods nothing in those directions.
	outside := Endpoint{IP: netip.MustParseAddr("198.18.0.254")}
	for _, self := range w.pods {
		if !p.Selects(self, nil) {
			continue
		}
		me := Endpoint{Pod: self, Namespace: w.nss[self.Namespace], IP: self.IPs[0]}
		for _, other := range append(slices.Clone(w.pods), nil) {
			if other == self {
				continue
			}
			peer := outside
			if other != nil {
				peer = Endpoint{Pod: other, Namespace: w.nss[other.Namespace], IP: other.IPs[0]}
			}
			for _, proto := range []Protocol{TCP, UDP, SCTP} {
				if p.Egress && Allowed([]*Policy{p}, me, peer, proto, 80) {
					t.Fatalf("Broken policy allows egress from %s/%s (%s)", self.Namespace, self.Name, msg)
				}
				if p.Ingress && Allowed([]*Policy{p}, peer, me, proto, 80) {
					t.Fatalf("Broken policy allows ingress to %s/%s (%s)", self.Namespace, self.Name, msg)
				}
			}
		}
	}
}

// checkSets: every entry is one ipset accepts in its set. hash:net takes
// prefixes of 1 to 32 (128) bits of the set's family, and an entry added
// twice, once with nomatch, leaves the kernel with whichever came last
// while the tracer takes the first: neither may happen.
func checkSets(t *testing.T, rs *Ruleset, ipv6 bool, spec *networkingv1.NetworkPolicySpec) {
	t.Helper()
	for name, s := range rs.Sets {
		if s.IPv6 != ipv6 {
			t.Fatalf("set %s of the wrong family", name)
		}
		seen := map[netip.Prefix]bool{}
		for _, e := range s.Entries {
			switch s.Type {
			case HashNet:
				cidr, _ := strings.CutSuffix(e, " nomatch")
				pfx, err := netip.ParsePrefix(cidr)
				if err != nil || pfx.Addr().Is6() != ipv6 || pfx.Addr().Is4In6() || pfx.Bits() < 1 || pfx != pfx.Masked() {
					t.Fatalf("set %s: entry %q cannot go in a %s ipset (spec %s)", name, e, s.Type, specJSON(spec))
				}
				if seen[pfx] {
					t.Fatalf("set %s: %s twice in %v (spec %s)", name, pfx, s.Entries, specJSON(spec))
				}
				seen[pfx] = true
			case HashIPPort:
				ip, _, _ := strings.Cut(e, ",")
				if a, err := netip.ParseAddr(ip); err != nil || a.Is6() != ipv6 {
					t.Fatalf("set %s: entry %q of the wrong family", name, e)
				}
			}
		}
	}
}

func setsString(rs *Ruleset) string {
	var b strings.Builder
	for n, s := range rs.Sets {
		fmt.Fprintf(&b, "%s=%v ", n, s.Entries)
	}
	return b.String()
}

func specJSON(spec *networkingv1.NetworkPolicySpec) string {
	b, err := json.Marshal(spec)
	if err != nil {
		return fmt.Sprintf("%+v", *spec)
	}
	return string(b)
}

// specIsolates reads policyTypes: "If this field is not specified, it will
// default based on the existence of ingress or egress rules".
func specIsolates(spec *networkingv1.NetworkPolicySpec) (ingress, egress bool) {
	if len(spec.PolicyTypes) == 0 {
		return true, len(spec.Egress) > 0
	}
	return slices.Contains(spec.PolicyTypes, networkingv1.PolicyTypeIngress), slices.Contains(spec.PolicyTypes, networkingv1.PolicyTypeEgress)
}

// specAllows is the API text read off the object itself, for objects that
// converted without error: a second reading of the semantics that shares
// no code with the conversion (addresses are parsed by package net).
func specAllows(np *networkingv1.NetworkPolicy, src, dst Endpoint, proto Protocol, port int32) bool {
	if src.Pod != nil && src.Pod == dst.Pod {
		return true
	}
	return specAllowsDir(np, src, dst, proto, port, true) && specAllowsDir(np, dst, src, proto, port, false)
}

func specAllowsDir(np *networkingv1.NetworkPolicy, self, peer Endpoint, proto Protocol, port int32, egress bool) bool {
	if self.Pod == nil || self.Pod.Namespace != np.Namespace {
		return true
	}
	sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
	if err != nil {
		return false // only a policy that failed to convert, which allows nothing
	}
	if !sel.Matches(self.Pod.Labels) {
		return true
	}
	in, eg := specIsolates(&np.Spec)
	type rule struct {
		peers []networkingv1.NetworkPolicyPeer
		ports []networkingv1.NetworkPolicyPort
	}
	var rules []rule
	dstPod := self.Pod
	switch {
	case egress && eg:
		for _, r := range np.Spec.Egress {
			rules = append(rules, rule{r.To, r.Ports})
		}
		dstPod = peer.Pod
	case !egress && in:
		for _, r := range np.Spec.Ingress {
			rules = append(rules, rule{r.From, r.Ports})
		}
	default:
		return true // not isolated in this direction
	}
	for _, r := range rules {
		if specPeerMatches(np.Namespace, r.peers, peer) && specPortMatches(r.ports, proto, port, dstPod) {
			return true
		}
	}
	return false
}

// "If this field is empty or missing, this rule matches all sources".
func specPeerMatches(namespace string, peers []networkingv1.NetworkPolicyPeer, peer Endpoint) bool {
	if len(peers) == 0 {
		return true
	}
	for _, p := range peers {
		if p.IPBlock != nil {
			if ipBlockContains(p.IPBlock, peer.IP) {
				return true
			}
			continue
		}
		if peer.Pod == nil {
			continue
		}
		if p.NamespaceSelector == nil {
			if peer.Pod.Namespace != namespace {
				continue
			}
		} else {
			s, err := metav1.LabelSelectorAsSelector(p.NamespaceSelector)
			if err != nil || peer.Namespace == nil || !s.Matches(peer.Namespace.Labels) {
				continue
			}
		}
		if p.PodSelector != nil {
			s, err := metav1.LabelSelectorAsSelector(p.PodSelector)
			if err != nil || !s.Matches(peer.Pod.Labels) {
				continue
			}
		}
		return true
	}
	return false
}

func ipBlockContains(b *networkingv1.IPBlock, a netip.Addr) bool {
	_, cidr, err := net.ParseCIDR(b.CIDR)
	ip := net.IP(a.AsSlice())
	if err != nil || !cidr.Contains(ip) {
		return false
	}
	for _, e := range b.Except {
		if _, ex, err := net.ParseCIDR(e); err == nil && ex.Contains(ip) {
			return false
		}
	}
	return true
}

// "If this field is empty or missing, this rule matches all ports"; a
// port's protocol defaults to TCP; a named port is the destination pod's.
func specPortMatches(ports []networkingv1.NetworkPolicyPort, proto Protocol, port int32, dst *Pod) bool {
	if len(ports) == 0 {
		return true
	}
	for _, pt := range ports {
		want := corev1.ProtocolTCP
		if pt.Protocol != nil {
			want = *pt.Protocol
		}
		if string(want) != string(proto) {
			continue
		}
		switch {
		case pt.Port == nil:
			return true
		case pt.Port.Type == intstr.String:
			if dst != nil {
				if n, ok := dst.NamedPorts[pt.Port.StrVal]; ok && n.Protocol == proto && n.Number == port {
					return true
				}
			}
		case pt.EndPort != nil:
			if port >= pt.Port.IntVal && port <= *pt.EndPort {
				return true
			}
		case port == pt.Port.IntVal:
			return true
		}
	}
	return false
}

// fuzzDecoder turns fuzz bytes into a NetworkPolicySpec: each choice reads
// a byte (zero once the input is used up), so short inputs make small
// policies and every field's odd values are a byte away.
type fuzzDecoder struct {
	b []byte
	i int
}

func (d *fuzzDecoder) byte() byte {
	if d.i >= len(d.b) {
		return 0
	}
	d.i++
	return d.b[d.i-1]
}

func (d *fuzzDecoder) n(n int) int { return int(d.byte()) % n }

func (d *fuzzDecoder) pick(s []string) string { return s[d.n(len(s))] }

var (
	fuzzKeys   = []string{"pod", "ns", "app", "team", "", "bad key!", "example.com/app", "a/b/c", strings.Repeat("k", 64), "-pod"}
	fuzzValues = []string{"a", "b", "c", "x", "y", "web", "blue", "", "bad value!", "-a", strings.Repeat("v", 64)}
	fuzzOps    = []string{"In", "NotIn", "Exists", "DoesNotExist", "Bogus", "", "in"}
	fuzzTypes  = []string{"Ingress", "Egress", "Bogus", "", "ingress"}
	fuzzProtos = []string{"TCP", "UDP", "SCTP", "ICMP", "", "tcp"}
	fuzzNames  = []string{"serve-80-tcp", "serve-81-udp", "serve-80-sctp", "http", "", "80", "nope", "bad name!"}
	fuzzBases  = []string{"10.244.1.2", "10.244.1.3", "10.244.2.2", "10.244.2.255", "10.244.4.2", "10.244.0.0", "0.0.0.0", "198.18.0.1", "255.255.255.255",
		"fd00:10:244:1::2", "fd00:10:244:2::2", "fd00:10:244:5::2", "fd00:10:244::", "::", "2001:db8::1", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::ffff:10.244.1.2"}
	fuzzBits    = []int{0, 1, 8, 16, 23, 24, 25, 31, 32, 33, 48, 63, 64, 96, 104, 112, 120, 127, 128, 129}
	fuzzGarbage = []string{"", "nope", "10.0.0.0", "10.0.0.0/-1", "fe80::1%eth0/64", " 10.0.0.0/8", "010.0.0.0/8", "10.0.0.0/8/8", "::/", "1.2.3.4/32\n"}
	fuzzPorts   = []int32{0, -1, 1, 53, 79, 80, 81, 443, 8080, 65535, 65536, -65536}
)

func (d *fuzzDecoder) selector() *metav1.LabelSelector {
	s := &metav1.LabelSelector{}
	for range d.n(3) {
		if s.MatchLabels == nil {
			s.MatchLabels = map[string]string{}
		}
		s.MatchLabels[d.pick(fuzzKeys)] = d.pick(fuzzValues)
	}
	for range d.n(3) {
		req := metav1.LabelSelectorRequirement{Key: d.pick(fuzzKeys), Operator: metav1.LabelSelectorOperator(d.pick(fuzzOps))}
		for range d.n(3) {
			req.Values = append(req.Values, d.pick(fuzzValues))
		}
		s.MatchExpressions = append(s.MatchExpressions, req)
	}
	return s
}

func (d *fuzzDecoder) maybeSelector() *metav1.LabelSelector {
	if d.n(2) == 0 {
		return nil
	}
	return d.selector()
}

// prefix writes a prefix: a base address and a length, host bits and all,
// or garbage.
func (d *fuzzDecoder) prefix() string {
	switch d.n(8) {
	case 0:
		return d.pick(fuzzGarbage)
	case 1:
		return fmt.Sprintf("%s/%d", d.pick(fuzzBases), d.byte()%130)
	default:
		return fmt.Sprintf("%s/%d", d.pick(fuzzBases), fuzzBits[d.n(len(fuzzBits))])
	}
}

// except writes an except of a cidr: mostly inside it (a random address of
// the block and a longer, equal or shorter length), sometimes anywhere.
func (d *fuzzDecoder) except(cidr string) string {
	pfx, err := netip.ParsePrefix(cidr)
	if err != nil || d.n(4) == 0 {
		return d.prefix()
	}
	b := pfx.Addr().AsSlice()
	if host := len(b)*8 - pfx.Bits(); host > 0 {
		for range d.n(3) {
			i := pfx.Bits() + d.n(host)
			b[i/8] ^= 0x80 >> (i % 8)
		}
	}
	a, _ := netip.AddrFromSlice(b)
	bits := pfx.Bits() + d.n(12) - 2
	bits = max(0, min(bits, a.BitLen()))
	return netip.PrefixFrom(a, bits).String()
}

func (d *fuzzDecoder) peer() networkingv1.NetworkPolicyPeer {
	var p networkingv1.NetworkPolicyPeer
	switch d.n(7) {
	case 0:
		p.PodSelector = d.selector()
	case 1:
		p.NamespaceSelector = d.selector()
	case 2:
		p.PodSelector, p.NamespaceSelector = d.selector(), d.selector()
	case 3, 4:
		p.IPBlock = &networkingv1.IPBlock{CIDR: d.prefix()}
		for range d.n(4) {
			p.IPBlock.Except = append(p.IPBlock.Except, d.except(p.IPBlock.CIDR))
		}
	case 5:
		p.IPBlock = &networkingv1.IPBlock{CIDR: d.prefix()}
		p.PodSelector, p.NamespaceSelector = d.maybeSelector(), d.maybeSelector()
	}
	return p // case 6: an empty peer
}

func (d *fuzzDecoder) port() networkingv1.NetworkPolicyPort {
	var p networkingv1.NetworkPolicyPort
	if d.n(3) != 0 {
		proto := corev1.Protocol(d.pick(fuzzProtos))
		p.Protocol = &proto
	}
	switch d.n(6) {
	case 1, 2:
		v := intstr.FromInt32(fuzzPorts[d.n(len(fuzzPorts))])
		p.Port = &v
	case 3:
		v := intstr.FromInt32(int32(d.byte())<<8 | int32(d.byte()))
		p.Port = &v
	case 4:
		v := intstr.FromString(d.pick(fuzzNames))
		p.Port = &v
	case 5:
		// Neither Int nor String: only a buggy client or conversion
		// makes one, but the type allows it.
		p.Port = &intstr.IntOrString{Type: intstr.Type(2 + d.n(3)), IntVal: 80, StrVal: "http"}
	}
	if d.n(3) == 0 {
		e := fuzzPorts[d.n(len(fuzzPorts))]
		if p.Port != nil && d.n(2) == 0 {
			e = p.Port.IntVal + int32(d.n(5)) - 1
		}
		p.EndPort = &e
	}
	return p
}

func (d *fuzzDecoder) spec() networkingv1.NetworkPolicySpec {
	var s networkingv1.NetworkPolicySpec
	if d.n(2) == 1 {
		s.PodSelector = *d.selector()
	}
	if d.n(2) == 1 {
		s.PolicyTypes = []networkingv1.PolicyType{}
		for range d.n(3) {
			s.PolicyTypes = append(s.PolicyTypes, networkingv1.PolicyType(d.pick(fuzzTypes)))
		}
	}
	peersPorts := func() ([]networkingv1.NetworkPolicyPeer, []networkingv1.NetworkPolicyPort) {
		var peers []networkingv1.NetworkPolicyPeer
		var ports []networkingv1.NetworkPolicyPort
		if n := d.n(5); n > 0 {
			peers = []networkingv1.NetworkPolicyPeer{}
			for range n - 1 {
				peers = append(peers, d.peer())
			}
		}
		if n := d.n(5); n > 0 {
			ports = []networkingv1.NetworkPolicyPort{}
			for range n - 1 {
				ports = append(ports, d.port())
			}
		}
		return peers, ports
	}
	for range d.n(3) {
		peers, ports := peersPorts()
		s.Ingress = append(s.Ingress, networkingv1.NetworkPolicyIngressRule{From: peers, Ports: ports})
	}
	for range d.n(3) {
		peers, ports := peersPorts()
		s.Egress = append(s.Egress, networkingv1.NetworkPolicyEgressRule{To: peers, Ports: ports})
	}
	return s
}

// TestFromNetworkPolicyInputChecks: what the conversion refuses, and the
// field each refusal names. Each input also goes through the fuzz checks.
// Some cannot be written in JSON (an IntOrString of neither type), so they
// are not fuzz seeds.
func TestFromNetworkPolicyInputChecks(t *testing.T) {
	in := func(peers ...networkingv1.NetworkPolicyPeer) networkingv1.NetworkPolicySpec {
		return networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{From: peers}}}
	}
	ports := func(pts ...networkingv1.NetworkPolicyPort) networkingv1.NetworkPolicySpec {
		return networkingv1.NetworkPolicySpec{Egress: []networkingv1.NetworkPolicyEgressRule{{}, {Ports: pts}}}
	}
	block := func(cidr string, except ...string) networkingv1.NetworkPolicyPeer {
		return networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: cidr, Except: except}}
	}
	pt := func(v intstr.IntOrString) networkingv1.NetworkPolicyPort {
		return networkingv1.NetworkPolicyPort{Port: &v}
	}
	cases := []struct {
		spec  networkingv1.NetworkPolicySpec
		field string // "" when it converts
	}{
		{networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{"Egress", "Bogus"}}, "spec.policyTypes[1]"},
		{networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{""}}, "spec.policyTypes[0]"},
		{in(networkingv1.NetworkPolicyPeer{PodSelector: sel("pod", "b")}, block("nope")), "spec.ingress[0].from[1].ipBlock.cidr"},
		{in(block("10.0.0.0/8", "10.1.0.0/16", "x")), "spec.ingress[0].from[0].ipBlock.except[1]"},
		{in(block("::ffff:10.0.0.0/104")), "spec.ingress[0].from[0].ipBlock.cidr"},
		{in(block("10.0.0.0/8", "::ffff:10.1.0.0/112")), "spec.ingress[0].from[0].ipBlock.except[0]"},
		{in(networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/8"}, NamespaceSelector: sel()}), "spec.ingress[0].from[0].ipBlock"},
		{in(networkingv1.NetworkPolicyPeer{}), "spec.ingress[0].from[0]"},
		{ports(pt(intstr.FromString(""))), "spec.egress[1].ports[0].port"},
		{ports(pt(intstr.IntOrString{Type: 2, IntVal: 80})), "spec.egress[1].ports[0].port"},
		{ports(pt(intstr.FromInt32(80)), pt(intstr.FromInt32(0))), "spec.egress[1].ports[1].port"},
		{ports(networkingv1.NetworkPolicyPort{EndPort: ptr.To[int32](80)}), "spec.egress[1].ports[0].endPort"},
		{ports(networkingv1.NetworkPolicyPort{Protocol: ptr.To(corev1.Protocol("ICMP"))}), "spec.egress[1].ports[0].protocol"},
		// Excepts that hold the whole block, or lie outside it, keep their
		// meaning: the first peer matches nothing, the second every
		// address of 10.244.0.0/16.
		{in(block("10.244.2.0/24", "10.244.0.0/16"), block("10.244.0.0/16", "10.245.0.0/16", "fd00::/8", "10.244.0.0/16")), ""},
		{in(block("10.244.2.0/24", "10.244.0.0/16")), ""},
		{in(block("10.244.0.0/16", "10.245.0.0/16", "fd00::/8")), ""},
	}
	w := newFuzzWorld()
	for i, c := range cases {
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "fuzz"}, Spec: c.spec}
		p := FromNetworkPolicy(np)
		if c.field == "" {
			if p.Broken != "" {
				t.Errorf("case %d: refused: %s", i, p.Broken)
			}
		} else if !strings.HasPrefix(p.Broken, c.field+": ") {
			t.Errorf("case %d: Broken %q, want it to name %s", i, p.Broken, c.field)
		}
		checkConversion(t, w, np)
	}
	// An ipBlock whose excepts cover it matches nothing: the rule must not
	// turn into "every peer".
	p := FromNetworkPolicy(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "empty"}, Spec: in(block("10.244.2.0/24", "10.244.2.0/24"))})
	if r := p.IngressRules; len(r) != 1 || r[0].Src.Peers == nil || len(r[0].Src.Peers) != 0 {
		t.Errorf("rule of an ipBlock that matches nothing: %+v", r)
	}
}
