package policy

import (
	"encoding/json"
	"math/rand"
	"slices"
	"strings"
	"testing"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	"github.com/projectcalico/api/pkg/lib/numorstring"
	calicoselector "github.com/projectcalico/calico/libcalico-go/lib/selector"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/sluice-net/sluice/internal/calicotest"
)

// TestKubernetesAndCalicoParity: for the fuzz seeds and random Kubernetes
// policies, the policy and its hand-translated Calico equivalent give the
// same truth table, by the evaluator and by the rendered rules.
func TestKubernetesAndCalicoParity(t *testing.T) {
	w := newFuzzWorld()
	var specs []networkingv1.NetworkPolicySpec
	for _, s := range fuzzSeeds {
		if spec, ok := specFromJSON([]byte(s)); ok {
			specs = append(specs, spec)
		}
	}
	rnd := rand.New(rand.NewSource(14))
	for i := 0; i < 1500; i++ {
		b := make([]byte, 64)
		rnd.Read(b)
		specs = append(specs, (&fuzzDecoder{b: b}).spec())
	}
	compared := 0
	for i := range specs {
		boundSpec(&specs[i])
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "parity"}, Spec: specs[i]}
		k := FromNetworkPolicy(np)
		if k.Broken != "" {
			continue
		}
		c := FromCalicoNetworkPolicy(calicotest.FromKubernetes(np), testTiers())
		if c.Broken != "" {
			// A peer or port Calico cannot express the same way (a
			// protocol without ports that Calico would need); say which.
			t.Logf("spec %d: no Calico equivalent: %s", i, c.Broken)
			continue
		}
		compared++
		protos, ports, outside := w.probes(&np.Spec)
		for _, ipv6 := range []bool{false, true} {
			rk, rc := w.render(k, ipv6), w.render(c, ipv6)
			for _, fl := range w.flows(ipv6, protos, ports, outside) {
				want := Allowed([]*Policy{k}, fl.src, fl.dst, fl.pkt.proto, fl.pkt.dport)
				if got := Allowed([]*Policy{c}, fl.src, fl.dst, fl.pkt.proto, fl.pkt.dport); got != want {
					t.Fatalf("spec %d %s: Calico allows=%v, Kubernetes %v\nspec %s\ncalico %+v", i, &fl, got, want, specJSON(&np.Spec), calicotest.FromKubernetes(np).Spec)
				}
				pkt := fl.pkt
				if got := forwardVerdict(t, rc, &pkt); got != forwardVerdict(t, rk, &pkt) {
					t.Fatalf("spec %d %s: the Calico rules allow=%v, the Kubernetes rules not", i, &fl, got)
				}
			}
		}
	}
	if compared < 100 {
		t.Errorf("only %d policies compared", compared)
	}
}

// FuzzCalicoSelector: any string either fails to parse with an error or
// gives a selector whose canonical form parses to itself and that
// matches label sets exactly as Calico's own evaluation does.
func FuzzCalicoSelector(f *testing.F) {
	for _, s := range append(testCalicoSelectors, "", "a == 'b' && (c != 'd' || !has(e))", "a in {'x','y'}", "global()",
		"a contains 'b'", "a starts with 'b' || a ends with 'c'", "!(a == 'b')", "a ==", "'", "has(", "a == \"b\"") {
		f.Add(s)
	}
	sets := []labels.Set{{}, {"a": "b"}, {"a": "x", "c": "d"}, {"role": "db", "pod": "a"}, {"kind": "ext", "e": ""}}
	f.Fuzz(func(t *testing.T, s string) {
		sel, err := ParseCalicoSelector(s)
		if err != nil {
			if !strings.Contains(err.Error(), "not a valid selector") {
				t.Fatalf("error %q does not say what is wrong", err)
			}
			return
		}
		again, err := ParseCalicoSelector(sel.String())
		if err != nil || again.String() != sel.String() {
			t.Fatalf("%q: canonical %q does not parse to itself (%v)", s, sel.String(), err)
		}
		ref, err := calicoselector.Parse(s)
		if err != nil {
			t.Fatalf("%q: the library refuses what the wrapper took: %v", s, err)
		}
		for _, l := range sets {
			if sel.Matches(l) != ref.Evaluate(l) {
				t.Fatalf("%q over %v: wrapper %v, Calico %v", s, l, sel.Matches(l), ref.Evaluate(l))
			}
		}
	})
}

// FuzzFromCalicoPolicy: a v3 NetworkPolicy or GlobalNetworkPolicy spec,
// as JSON, converts without panic into either a policy that names the
// failing field and denies what it selects, or one whose rendered rules
// the evaluator agrees with on every flow of the tiered world.
func FuzzFromCalicoPolicy(f *testing.F) {
	for _, s := range calicoFuzzSeeds {
		f.Add([]byte(s), false)
		f.Add([]byte(s), true)
	}
	w := newTierWorld()
	f.Add([]byte{0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c}, true)
	f.Add([]byte(strings.Repeat("\x03\x05\x02\x06\x04\x01", 20)), false)
	f.Fuzz(func(t *testing.T, data []byte, global bool) {
		var spec v3.GlobalNetworkPolicySpec
		if json.Unmarshal(data, &spec) != nil {
			spec = (&calicoDecoder{fuzzDecoder{b: data}}).spec()
		}
		if tooBig(&spec.Ingress, &spec.Egress) {
			return
		}
		var p *Policy
		if global {
			p = FromCalicoGlobalNetworkPolicy(&v3.GlobalNetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "fuzz"}, Spec: spec}, testTiers())
		} else {
			np := v3.NetworkPolicySpec{Tier: spec.Tier, Order: spec.Order, Ingress: spec.Ingress, Egress: spec.Egress, Selector: spec.Selector,
				Types: spec.Types, ServiceAccountSelector: spec.ServiceAccountSelector}
			p = FromCalicoNetworkPolicy(&v3.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "fuzz"}, Spec: np}, testTiers())
		}
		if p.PodSelector == nil || p.Tier == nil {
			t.Fatalf("no selector or tier: %+v", p)
		}
		if p.Broken != "" {
			if !strings.HasPrefix(p.Broken, "spec.") {
				t.Fatalf("Broken %q does not name the field", p.Broken)
			}
			for _, rules := range [][]Rule{p.IngressRules, p.EgressRules} {
				for _, r := range rules {
					if r.Action != Deny || r.Protocol != "" || r.Src.Selector != nil || r.Dst.Nets != nil {
						t.Fatalf("broken policy keeps a rule other than Deny all: %+v", r)
					}
				}
			}
		}
		for _, ipv6 := range []bool{false, true} {
			if n, first := w.disagreements(t, []*Policy{p}, w.render([]*Policy{p}, ipv6), ipv6); n > 0 {
				t.Fatalf("ipv6=%v: %d flows disagree; first: %s\n%s", ipv6, n, first, data)
			}
		}
	})
}

// tooBig keeps fuzzed policies small enough to trace.
func tooBig(in, eg *[]v3.Rule) bool { return len(*in)+len(*eg) > 6 }

var calicoFuzzSeeds = []string{
	`{"selector":"pod == 'a'","ingress":[{"action":"Deny","protocol":"TCP","source":{"selector":"pod == 'b'"},"destination":{"ports":[80]}}]}`,
	`{"tier":"security","selector":"all()","ingress":[{"action":"Pass","source":{"selector":"role == 'web'"}},{"action":"Deny"}]}`,
	`{"tier":"passing","selector":"all()","ingress":[{"action":"Deny","protocol":"UDP"}]}`,
	`{"selector":"all()","types":["Egress"],"egress":[{"action":"Allow","destination":{"selector":"kind == 'partner'"}},{"action":"Allow","destination":{"namespaceSelector":"global()","selector":"kind == 'ext'"}}]}`,
	`{"selector":"pod == 'a'","ingress":[{"action":"Allow","protocol":"ICMP","icmp":{"type":8}},{"action":"Allow","protocol":"ICMPv6","notICMP":{"type":128,"code":0}}]}`,
	`{"selector":"pod == 'a'","ingress":[{"action":"Allow","protocol":"TCP","source":{"notNets":["10.244.2.0/24","fd00:10:244:2::/64"],"ports":["1000:2000"]},"destination":{"notPorts":[22,"1000:2000","http"]}}]}`,
	`{"serviceAccountSelector":"sa == 'a'","ingress":[{"action":"Allow","source":{"serviceAccounts":{"names":["sa-b"],"selector":"sa == 'b'"}}}]}`,
	`{"selector":"pod == 'a'","ingress":[{"action":"Log","protocol":"TCP","destination":{"ports":[80,"dns"]}},{"action":"Allow","ipVersion":6}]}`,
	`{"namespaceSelector":"team == 'red'","selector":"role != 'db'","egress":[{"action":"Deny","notProtocol":"UDP","destination":{"nets":["0.0.0.0/0","::/0"],"notSelector":"kind == 'ext'"}}]}`,
	`{"selector":"a ===","ingress":[{"action":"Allow"}]}`,
	`{"ingress":[{"action":"Allow","http":{"methods":["GET"]}}],"egress":[{"action":"Allow"}]}`,
	`{"ingress":[{"action":"Allow","protocol":47},{"action":"Deny","protocol":"udplite"}]}`,
	`{"types":["Ingress","Egress"],"ingress":[{"action":"Allow","source":{"nets":["198.18.0.0/24"]},"destination":{"nets":["10.244.1.2"]}}]}`,
}

// calicoDecoder builds a v3 spec from fuzz bytes, field by field, when
// they are not JSON: the fuzzer then explores the fields' combinations
// (valid and not) rather than JSON syntax.
type calicoDecoder struct{ fuzzDecoder }

var (
	fuzzActions     = []string{"Allow", "Deny", "Pass", "Log", "", "Accept"}
	fuzzProtocols   = []string{"TCP", "UDP", "ICMP", "ICMPv6", "SCTP", "udplite", "banana", "6", "47"}
	fuzzNets        = []string{"198.18.0.0/24", "10.244.1.0/24", "0.0.0.0/0", "2001:db8::/64", "::/0", "10.244.1.2", "nope", "10.0.0.0/33"}
	fuzzSelectors   = append(slices.Clone(testCalicoSelectors), "", "a ===", "global()", "projectcalico.org/namespace == 'x'")
	fuzzNsSelector  = []string{"", "team == 'red'", "global()", "all()", "bad ((("}
	fuzzCalicoPorts = []numorstring.Port{numorstring.SinglePort(80), numorstring.SinglePort(53), {MinPort: 53, MaxPort: 81}, numorstring.NamedPort("http"),
		numorstring.NamedPort("dns"), {MinPort: 90, MaxPort: 80}, numorstring.SinglePort(0)}
)

func (d *calicoDecoder) entity() v3.EntityRule {
	var e v3.EntityRule
	for n := d.n(3); n > 0; n-- {
		switch d.n(7) {
		case 0:
			e.Nets = append(e.Nets, d.pick(fuzzNets))
		case 1:
			e.NotNets = append(e.NotNets, d.pick(fuzzNets))
		case 2:
			e.Selector = d.pick(fuzzSelectors)
		case 3:
			e.NotSelector = d.pick(fuzzSelectors)
		case 4:
			e.NamespaceSelector = d.pick(fuzzNsSelector)
		case 5:
			e.Ports = append(e.Ports, fuzzCalicoPorts[d.n(len(fuzzCalicoPorts))])
		default:
			e.NotPorts = append(e.NotPorts, fuzzCalicoPorts[d.n(len(fuzzCalicoPorts))])
		}
	}
	if d.n(8) == 0 {
		e.ServiceAccounts = &v3.ServiceAccountMatch{Names: []string{"sa-a"}, Selector: d.pick([]string{"", "sa == 'b'"})}
	}
	return e
}

func (d *calicoDecoder) rule() v3.Rule {
	r := v3.Rule{Action: v3.Action(d.pick(fuzzActions)), Source: d.entity(), Destination: d.entity()}
	if d.n(3) > 0 {
		p := numorstring.ProtocolFromString(d.pick(fuzzProtocols))
		r.Protocol = &p
	}
	if d.n(5) == 0 {
		p := numorstring.ProtocolFromString(d.pick(fuzzProtocols))
		r.NotProtocol = &p
	}
	if d.n(3) == 0 {
		typ, code := []int{8, 128, 13, 300}[d.n(4)], d.n(3)-1
		f := &v3.ICMPFields{Type: &typ}
		if code >= 0 {
			f.Code = &code
		}
		if d.n(2) == 0 {
			r.ICMP = f
		} else {
			r.NotICMP = f
		}
	}
	if d.n(5) == 0 {
		v := []int{4, 6, 5}[d.n(3)]
		r.IPVersion = &v
	}
	return r
}

func (d *calicoDecoder) spec() v3.GlobalNetworkPolicySpec {
	s := v3.GlobalNetworkPolicySpec{Tier: d.pick([]string{"", "security", "passing", "nope"}), Selector: d.pick(fuzzSelectors)}
	if d.n(2) == 0 {
		o := float64(d.n(3) * 100)
		s.Order = &o
	}
	if d.n(3) == 0 {
		s.NamespaceSelector = d.pick(fuzzNsSelector)
	}
	for n := d.n(3); n > 0; n-- {
		s.Types = append(s.Types, v3.PolicyType(d.pick([]string{"Ingress", "Egress", "Sideways"})))
	}
	for n := d.n(3); n > 0; n-- {
		s.Ingress = append(s.Ingress, d.rule())
	}
	for n := d.n(3); n > 0; n-- {
		s.Egress = append(s.Egress, d.rule())
	}
	return s
}
