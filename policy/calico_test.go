package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

// testTiers are the tiers of the Calico tests: security ahead of the
// default tier, and a Pass tier.
func testTiers() TierLookup {
	tiers := map[string]*Tier{
		"default":  DefaultTier(),
		"security": {Name: "security", Order: 100, DefaultAction: Deny},
		"passing":  {Name: "passing", Order: 50, DefaultAction: Pass},
	}
	return func(name string) *Tier { return tiers[name] }
}

// fromYAML converts one projectcalico.org/v3 object written as YAML.
func fromYAML(t *testing.T, doc string) *Policy {
	t.Helper()
	var meta struct{ Kind string }
	if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
		t.Fatal(err)
	}
	var p *Policy
	switch meta.Kind {
	case "NetworkPolicy":
		var o v3.NetworkPolicy
		mustYAML(t, doc, &o)
		p = FromCalicoNetworkPolicy(&o, testTiers())
	case "GlobalNetworkPolicy":
		var o v3.GlobalNetworkPolicy
		mustYAML(t, doc, &o)
		p = FromCalicoGlobalNetworkPolicy(&o, testTiers())
	case "StagedNetworkPolicy":
		var o v3.StagedNetworkPolicy
		mustYAML(t, doc, &o)
		p = FromStagedNetworkPolicy(&o, testTiers())
	default:
		t.Fatalf("kind %q", meta.Kind)
	}
	return p
}

func mustYAML(t *testing.T, doc string, into any) {
	t.Helper()
	if err := yaml.UnmarshalStrict([]byte(doc), into); err != nil {
		t.Fatalf("%v\n%s", err, doc)
	}
}

// k8sPolicy converts a networking/v1 NetworkPolicy written as YAML.
func k8sPolicy(t *testing.T, doc string) *Policy {
	var np networkingv1.NetworkPolicy
	mustYAML(t, doc, &np)
	return FromNetworkPolicy(&np)
}

// calicoCase is one truth-table row: from, to (pod keys "ns/name" or an
// address), protocol, port (or ICMP type), and the verdict.
type calicoCase struct {
	src, dst string
	proto    Protocol
	port     int32
	allowed  bool
}

// check decides each row by the evaluator and by the rendered rules of
// both families where the row's addresses exist.
func (w *tierWorld) check(t *testing.T, pols []*Policy, rows []calicoCase) {
	t.Helper()
	for _, p := range pols {
		if p.Broken != "" {
			t.Fatalf("%s: %s", p.Key, p.Broken)
		}
	}
	e := &Evaluator{Policies: pols, NetworkSets: w.netsets, Namespaces: w.nss}
	for _, ipv6 := range []bool{false, true} {
		rs := w.render(pols, ipv6)
		for _, row := range rows {
			src, okS := w.end(row.src, ipv6)
			dst, okD := w.end(row.dst, ipv6)
			if !okS || !okD {
				continue
			}
			f := Flow{Src: src, Dst: dst, Proto: row.proto, SrcPort: 40000, DstPort: row.port}
			pkt := packet{src: src.IP, dst: dst.IP, proto: row.proto, sport: 40000, dport: row.port}
			if isICMP(row.proto) {
				f.DstPort, pkt.dport = 0, 0
				f.ICMPType, pkt.icmpType = row.port, row.port
				if ipv6 {
					f.Proto, pkt.proto = ICMPv6, ICMPv6
					f.ICMPType, pkt.icmpType = map[int32]int32{8: 128, 13: 1}[row.port], map[int32]int32{8: 128, 13: 1}[row.port]
				}
			}
			if src.Pod != nil {
				pkt.in = w.veth(src.Pod)
			}
			if dst.Pod != nil {
				pkt.out = w.veth(dst.Pod)
			}
			if got := e.Verdict(f).Allowed(); got != row.allowed {
				t.Errorf("ipv6=%v %s -> %s %s/%d: evaluator allows=%v, want %v", ipv6, row.src, row.dst, row.proto, row.port, got, row.allowed)
			}
			if got, _ := traceForward(t, rs, &pkt); got != row.allowed {
				t.Errorf("ipv6=%v %s -> %s %s/%d: rules allow=%v, want %v", ipv6, row.src, row.dst, row.proto, row.port, got, row.allowed)
			}
		}
	}
}

// end is a row's endpoint in a family: a pod by key, or an address.
func (w *tierWorld) end(s string, ipv6 bool) (Endpoint, bool) {
	for _, p := range w.pods {
		if p.Namespace+"/"+p.Name == s {
			return w.endpoint(p, ipv6), true
		}
	}
	a := netip.MustParseAddr(s)
	return Endpoint{IP: a}, a.Is6() == ipv6
}

const allowXAFromXB = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: allow-b}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
`

func TestCalicoDenyOrderedBeforeAKubernetesAllow(t *testing.T) {
	w := newTierWorld()
	deny := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: deny-b}
spec:
  order: 10
  selector: pod == 'a'
  ingress:
  - {action: Deny, protocol: TCP, source: {selector: pod == 'b'}, destination: {ports: [80]}}
`)
	k := k8sPolicy(t, allowXAFromXB)
	w.check(t, []*Policy{deny, k}, []calicoCase{
		{"x/b", "x/a", TCP, 80, false}, // the Deny comes first
		{"x/b", "x/a", TCP, 1000, true},
		{"x/b", "x/a", UDP, 80, true},
		{"y/b", "x/a", TCP, 1000, false}, // the end of the default tier
	})
	// Ordered after the Kubernetes policy (1000), the Allow decides first.
	later := *deny
	later.Order = 2000
	w.check(t, []*Policy{&later, k}, []calicoCase{{"x/b", "x/a", TCP, 80, true}})
}

func TestCalicoPassIntoTheDefaultTier(t *testing.T) {
	w := newTierWorld()
	pass := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.pass-web}
spec:
  tier: security
  selector: all()
  ingress:
  - {action: Pass, source: {selector: role == 'web'}}
  - {action: Deny}
`)
	k := k8sPolicy(t, allowXAFromXB)
	w.check(t, []*Policy{pass, k}, []calicoCase{
		{"x/b", "x/a", TCP, 80, true},  // passed on, the Kubernetes policy allows
		{"y/b", "x/a", TCP, 80, false}, // passed on, the default tier ends in a drop
		{"x/a", "x/b", TCP, 80, false}, // security denies: never reaches default
		{"y/b", "y/a", TCP, 80, true},  // passed on, no default-tier policy selects y/a
	})
}

func TestCalicoEndOfTierVersusATierThatSelectsNothing(t *testing.T) {
	w := newTierWorld()
	onlyX := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.x-from-a}
spec:
  tier: security
  namespaceSelector: ns == 'x'
  selector: all()
  ingress: [{action: Allow, source: {selector: pod == 'a'}}]
`)
	w.check(t, []*Policy{onlyX}, []calicoCase{
		{"y/a", "x/b", TCP, 80, true},  // allowed in the security tier
		{"y/b", "x/b", TCP, 80, false}, // selected, nothing matched: end of tier
		{"x/a", "y/b", TCP, 80, true},  // y/b is not selected by the tier: skipped
		{"x/b", "x/a", UDP, 53, false},
	})
}

func TestCalicoDefaultActionPass(t *testing.T) {
	w := newTierWorld()
	p := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: passing.deny-udp}
spec:
  tier: passing
  selector: all()
  ingress: [{action: Deny, protocol: UDP}]
`)
	k := k8sPolicy(t, allowXAFromXB)
	w.check(t, []*Policy{p, k}, []calicoCase{
		{"x/b", "x/a", UDP, 53, false}, // denied in the Pass tier
		{"x/b", "x/a", TCP, 80, true},  // no match: passed to the default tier, allowed
		{"y/a", "x/a", TCP, 80, false}, // passed, then the default tier's drop
		{"y/a", "y/b", TCP, 80, true},  // passed, and nothing else selects y/b
	})
}

func TestCalicoGlobalPolicyWithNamespaceSelector(t *testing.T) {
	w := newTierWorld()
	p := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: red-isolated}
spec:
  namespaceSelector: team == 'red'
  selector: all()
  types: [Ingress]
  ingress: [{action: Allow, source: {namespaceSelector: team == 'red'}}]
`)
	w.check(t, []*Policy{p}, []calicoCase{
		{"x/b", "x/a", TCP, 80, true},
		{"y/b", "x/a", TCP, 80, false},
		{"x/b", "y/a", TCP, 80, true}, // y is not red: not selected
	})
}

func TestCalicoNetworkSets(t *testing.T) {
	w := newTierWorld()
	p := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: egress-to-sets}
spec:
  selector: all()
  types: [Egress]
  egress:
  - {action: Allow, destination: {selector: kind == 'partner'}}
  - {action: Allow, destination: {namespaceSelector: global(), selector: kind == 'ext'}}
`)
	w.check(t, []*Policy{p}, []calicoCase{
		{"x/a", "198.19.1.1", TCP, 443, true},   // x/partners, same namespace
		{"x/a", "2001:db9::1", TCP, 443, true},  // and its IPv6 net
		{"x/a", "198.18.0.254", TCP, 443, true}, // the global set, by global()
		{"x/a", "203.0.113.1", TCP, 443, false}, // in no set
		{"x/a", "y/a", TCP, 80, false},
	})
}

func TestCalicoICMPTypes(t *testing.T) {
	w := newTierWorld()
	p := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: ping-only}
spec:
  selector: pod == 'a'
  ingress:
  - {action: Allow, protocol: ICMP, icmp: {type: 8}}
  - {action: Allow, protocol: ICMPv6, icmp: {type: 128}}
`)
	w.check(t, []*Policy{p}, []calicoCase{
		{"x/b", "x/a", ICMP, 8, true},   // echo request (128 in IPv6)
		{"x/b", "x/a", ICMP, 13, false}, // timestamp (1 in IPv6)
		{"x/b", "x/a", TCP, 80, false},
	})
}

func TestCalicoNotNetsAndNotPorts(t *testing.T) {
	w := newTierWorld()
	p := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: nots}
spec:
  selector: pod == 'a'
  ingress:
  - action: Allow
    protocol: TCP
    source: {notNets: [10.244.2.0/24, "fd00:10:244:2::/64"]}
    destination: {notPorts: [22, "1000:2000"]}
`)
	w.check(t, []*Policy{p}, []calicoCase{
		{"y/a", "x/a", TCP, 80, true},
		{"y/a", "x/a", TCP, 1500, false}, // a notPort range
		{"x/b", "x/a", TCP, 80, false},   // x/b is 10.244.2.2: a notNet
		{"203.0.113.1", "x/a", TCP, 80, true},
	})
}

func TestCalicoServiceAccountSelector(t *testing.T) {
	w := newTierWorld()
	p := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: sa}
spec:
  serviceAccountSelector: sa == 'a'
  ingress: [{action: Allow, source: {serviceAccounts: {names: [sa-b]}}}]
`)
	w.check(t, []*Policy{p}, []calicoCase{
		{"x/b", "y/a", TCP, 80, true},  // from service account sa-b, any namespace
		{"y/a", "x/a", TCP, 80, false}, // sa-a is not allowed
		{"x/a", "x/b", TCP, 80, true},  // x/b's account is not selected
	})
}

func TestCalicoStagedPolicyChangesNothing(t *testing.T) {
	w := newTierWorld()
	staged := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: StagedNetworkPolicy
metadata: {namespace: x, name: would-deny}
spec:
  tier: security
  selector: all()
  ingress: [{action: Deny}]
`)
	if !staged.Staged {
		t.Fatal("not staged")
	}
	w.check(t, []*Policy{staged}, []calicoCase{{"x/b", "x/a", TCP, 80, true}, {"y/b", "x/a", UDP, 53, true}})
	// The would-be verdict is kept.
	e := &Evaluator{Policies: []*Policy{staged}, Staged: true}
	f := Flow{Src: w.endpoint(w.pods[1], false), Dst: w.endpoint(w.pods[0], false), Proto: TCP, DstPort: 80}
	if v := e.Verdict(f); v.Ingress.Allowed || v.Ingress.Policy != staged.Key {
		t.Errorf("staged verdict %+v, want a deny by %s", v, staged.Key)
	}
}

// TestCalicoSelectorTraps: "!=" and "not in" match an absent label; an
// omitted selector matches any address, all() only endpoints (and
// network sets).
func TestCalicoSelectorTraps(t *testing.T) {
	sel := func(s string) Selector {
		x, err := ParseCalicoSelector(s)
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	for _, c := range []struct {
		sel  string
		lbls labels.Set
		want bool
	}{
		{"role != 'db'", labels.Set{}, true},
		{"role not in {'db'}", labels.Set{}, true},
		{"role == 'db'", labels.Set{}, false},
		{"has(role) && role != 'db'", labels.Set{}, false},
		{"!has(role)", labels.Set{"role": ""}, false},
		{"role contains 'e'", labels.Set{"role": "web"}, true},
		{"role starts with 'w'", labels.Set{"role": "web"}, true},
		{"role ends with 'b'", labels.Set{"role": "db"}, true},
		{"(role == 'db' || role == 'web') && !has(x)", labels.Set{"role": "web"}, true},
		{"all()", labels.Set{}, true},
		{"", labels.Set{"a": "b"}, true},
	} {
		if got := sel(c.sel).Matches(c.lbls); got != c.want {
			t.Errorf("%q over %v: %v, want %v", c.sel, c.lbls, got, c.want)
		}
	}
	w := newTierWorld()
	omitted := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: any-source}
spec:
  selector: pod == 'a'
  ingress: [{action: Allow, protocol: TCP}]
`)
	w.check(t, []*Policy{omitted}, []calicoCase{{"203.0.113.1", "x/a", TCP, 80, true}, {"y/b", "x/a", TCP, 80, true}})
	all := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: endpoints-only}
spec:
  selector: pod == 'a'
  ingress: [{action: Allow, protocol: TCP, source: {selector: all()}}]
`)
	w.check(t, []*Policy{all}, []calicoCase{
		{"203.0.113.1", "x/a", TCP, 80, false}, // not an endpoint
		{"x/b", "x/a", TCP, 80, true},
		{"y/b", "x/a", TCP, 80, false}, // another namespace
	})
}

func TestCalicoLogDoesNotDecide(t *testing.T) {
	w := newTierWorld()
	p := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: log-then-allow}
spec:
  selector: pod == 'a'
  ingress: [{action: Log, protocol: TCP}, {action: Allow, protocol: TCP, destination: {ports: [80]}}]
`)
	w.check(t, []*Policy{p}, []calicoCase{{"x/b", "x/a", TCP, 80, true}, {"x/b", "x/a", TCP, 81, false}})
	rs := w.render([]*Policy{p}, false)
	pkt := packet{in: w.veth(w.pods[1]), out: w.veth(w.pods[0]), src: w.pods[1].IPs[0], dst: w.pods[0].IPs[0], proto: TCP, sport: 4000, dport: 80}
	if _, logs := traceForward(t, rs, &pkt); len(logs) != 1 || logs[0] != LogPrefix(p.Key, false, 0) {
		t.Errorf("logs %v, want one record %s", logs, LogPrefix(p.Key, false, 0))
	}
}

// TestCalicoDefaultingAndValidation: Calico's defaults, and each rejected
// field named, with the policy failing closed.
func TestCalicoDefaultingAndValidation(t *testing.T) {
	p := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: defaults}
spec:
  egress: [{action: Allow}]
`)
	if p.Tier.Name != "default" || p.Order != NoOrder || p.Ingress || !p.Egress || p.PodSelector.String() != "all()" {
		t.Errorf("defaults: tier %s order %v ingress %v egress %v selector %s", p.Tier.Name, p.Order, p.Ingress, p.Egress, p.PodSelector)
	}
	for _, c := range []struct{ spec, field string }{
		{`{ingress: [{action: Accept}]}`, "spec.ingress[0].action"},
		{`{ingress: [{action: Allow, destination: {ports: [80]}}]}`, "spec.ingress[0].destination.ports"},
		{`{ingress: [{action: Allow, protocol: TCP, icmp: {type: 8}}]}`, "spec.ingress[0].icmp"},
		{`{ingress: [{action: Allow, protocol: ICMP, icmp: {code: 0}}]}`, "spec.ingress[0].icmp.code"},
		{`{ingress: [{action: Allow, source: {nets: [10.0.0.0/33]}}]}`, "spec.ingress[0].source.nets[0]"},
		{`{ingress: [{action: Allow, ipVersion: 4, source: {nets: ["fd00::/8"]}}]}`, "spec.ingress[0].source.nets[0]"},
		{`{ingress: [{action: Allow, source: {selector: "a ==="}}]}`, "spec.ingress[0].source.selector"},
		{`{selector: "a ==="}`, "spec.selector"},
		{`{selector: "global()"}`, "spec.selector"},
		{`{ingress: [{action: Allow, source: {selector: "global() || a == 'b'"}}]}`, "spec.ingress[0].source.selector"},
		{`{tier: nope}`, "spec.tier"},
		{`{ingress: [{action: Allow, http: {methods: [GET]}}]}`, "spec.ingress[0].http"},
		{`{ingress: [{action: Allow, destination: {services: {name: web}}}]}`, "spec.ingress[0].destination.services"},
		{`{types: [Sideways]}`, "spec.types[0]"},
		{`{ingress: [{action: Allow, protocol: banana}]}`, "spec.ingress[0].protocol"},
	} {
		p := fromYAML(t, fmt.Sprintf("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {namespace: x, name: bad}\nspec: %s\n", c.spec))
		if !strings.HasPrefix(p.Broken, c.field+":") {
			t.Errorf("%s: Broken %q, want it to name %s", c.spec, p.Broken, c.field)
			continue
		}
		// Fails closed: what it selects is denied in its directions.
		e := &Evaluator{Policies: []*Policy{p}}
		w := newTierWorld()
		f := Flow{Src: w.endpoint(w.pods[1], false), Dst: w.endpoint(w.pods[0], false), Proto: TCP, DstPort: 80}
		if p.Ingress && e.Verdict(f).Ingress.Allowed {
			t.Errorf("%s: broken policy allows ingress", c.spec)
		}
	}
	gnp := fromYAML(t, "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: dnt}\nspec: {doNotTrack: true, ingress: [{action: Allow}]}\n")
	if !strings.HasPrefix(gnp.Broken, "spec.doNotTrack:") || gnp.IngressRules[0].Action != Deny {
		t.Errorf("doNotTrack: %q %+v", gnp.Broken, gnp.IngressRules)
	}
}

// TestCalicoDocumentedExamples converts the examples the README shows
// (Calico's documented shapes) and checks what they promise.
func TestCalicoDocumentedExamples(t *testing.T) {
	w := newTierWorld()
	dnsOnly := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-egress-except-dns}
spec:
  selector: all()
  types: [Egress]
  egress:
  - action: Allow
    protocol: UDP
    destination:
      ports: [53]
  - action: Allow
    protocol: TCP
    destination:
      ports: [53]
`)
	w.check(t, []*Policy{dnsOnly}, []calicoCase{
		{"x/a", "y/a", UDP, 53, true}, {"x/a", "203.0.113.1", TCP, 53, true},
		{"x/a", "y/a", TCP, 80, false}, {"x/a", "203.0.113.1", TCP, 443, false},
	})
}

// TestRefusedChainsFailClosedByKind: a chain the kernel refuses is
// replaced by one that allows nothing when its policy only allows (the
// end of the tier decides), and by a DROP when it could deny, pass or
// log, where returning would skip its Deny or Pass.
func TestRefusedChainsFailClosedByKind(t *testing.T) {
	r := &Renderer{AcceptMark: 0x10000}
	k := k8sPolicy(t, allowXAFromXB)
	deny := fromYAML(t, "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {namespace: x, name: d}\nspec: {ingress: [{action: Deny, protocol: TCP}]}\n")
	pass := fromYAML(t, "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {namespace: x, name: p}\nspec: {ingress: [{action: Pass}, {action: Allow}]}\n")
	for _, c := range []struct {
		p    *Policy
		want string
	}{{k, "-j RETURN"}, {deny, "-j DROP"}, {pass, "-j DROP"}} {
		rules, _ := r.policyRules(c.p, false)
		got := failClosed(PolicyChain(c.p.Key, false), rules)
		if len(got) != 1 || !strings.HasSuffix(got[0], c.want) {
			t.Errorf("%s: fail-closed chain %v, want it to end in %s", c.p.Key, got, c.want)
		}
	}
}

// TestTierDefaults: no order is last, no default action is Deny; the
// default tier keeps Deny whatever it says, and an unknown action is
// refused as Deny.
func TestTierDefaults(t *testing.T) {
	pass, allow := v3.Pass, v3.Allow
	for _, c := range []struct {
		tier    v3.Tier
		order   float64
		action  Action
		invalid bool
	}{
		{v3.Tier{ObjectMeta: metav1.ObjectMeta{Name: "t"}}, NoOrder, Deny, false},
		{v3.Tier{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, DefaultTierOrder, Deny, false},
		{v3.Tier{ObjectMeta: metav1.ObjectMeta{Name: "t"}, Spec: v3.TierSpec{DefaultAction: &pass}}, NoOrder, Pass, false},
		{v3.Tier{ObjectMeta: metav1.ObjectMeta{Name: "default"}, Spec: v3.TierSpec{DefaultAction: &pass}}, DefaultTierOrder, Deny, true},
		{v3.Tier{ObjectMeta: metav1.ObjectMeta{Name: "t"}, Spec: v3.TierSpec{DefaultAction: &allow}}, NoOrder, Deny, true},
	} {
		got, err := FromTier(&c.tier)
		if got.Order != c.order || got.DefaultAction != c.action || (err != nil) != c.invalid {
			t.Errorf("%s %+v: %+v, %v", c.tier.Name, c.tier.Spec, got, err)
		}
	}
}

// TestCalicoAddedLabels: Calico selectors see the labels Calico gives
// pods, namespaces and network sets; Kubernetes selectors do not.
func TestCalicoAddedLabels(t *testing.T) {
	w := newTierWorld()
	p := fromYAML(t, `
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: by-calico-labels}
spec:
  selector: projectcalico.org/namespace == 'x' && projectcalico.org/orchestrator == 'k8s'
  types: [Ingress]
  ingress: [{action: Allow, source: {namespaceSelector: projectcalico.org/name == 'y', selector: projectcalico.org/serviceaccount == 'sa-a'}}]
`)
	w.check(t, []*Policy{p}, []calicoCase{
		{"y/a", "x/b", TCP, 80, true},  // y's service account sa-a
		{"y/b", "x/b", TCP, 80, false}, // sa-b
		{"x/a", "x/b", TCP, 80, false}, // namespace x
		{"x/a", "y/b", TCP, 80, true},  // y is not selected
	})
	k := k8sPolicy(t, `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: k}
spec:
  podSelector: {matchExpressions: [{key: projectcalico.org/namespace, operator: DoesNotExist}]}
  ingress: []
`)
	if !k.Selects(w.pods[0], w.nss["x"]) {
		t.Error("a Kubernetes selector saw a label Calico adds")
	}
}

// TestUndecodableCanalObjectFailsClosedForItsSubject: a v1 object the v3
// types refuse still fails closed only for whom it selects, as far as
// that can be read.
func TestUndecodableCanalObjectFailsClosedForItsSubject(t *testing.T) {
	u := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "crd.projectcalico.org/v1", "kind": "GlobalNetworkPolicy",
		"metadata": map[string]any{"name": "bad-port"},
		"spec": map[string]any{"selector": "role == 'db'", "types": []any{"Ingress"},
			"ingress": []any{map[string]any{"action": "Allow", "protocol": "TCP", "destination": map[string]any{"ports": []any{"90:80"}}}}},
	}}
	_, err := decode[v3.GlobalNetworkPolicy](u)
	if err == nil {
		t.Fatal("the object decodes")
	}
	p := undecodable(CalicoGlobalNetworkPolicyKey+"bad-port", u, err)
	w := newTierWorld()
	if !strings.HasPrefix(p.Broken, "spec:") || !p.Ingress || p.Egress {
		t.Fatalf("broken %q ingress %v egress %v", p.Broken, p.Ingress, p.Egress)
	}
	for _, pod := range w.pods {
		if got, want := p.Selects(pod, w.nss[pod.Namespace]), pod.Labels["role"] == "db"; got != want {
			t.Errorf("%s/%s: selected %v, want %v", pod.Namespace, pod.Name, got, want)
		}
	}
	w.check(t, []*Policy{withoutBroken(p)}, []calicoCase{{"x/b", "x/a", TCP, 80, false}, {"x/a", "x/b", TCP, 80, true}})
}

// withoutBroken returns the policy with Broken cleared, for check, which
// refuses broken policies by default.
func withoutBroken(p *Policy) *Policy {
	c := *p
	c.Broken = ""
	return &c
}
