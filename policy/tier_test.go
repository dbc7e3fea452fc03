package policy

import (
	"fmt"
	"math/rand"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/sluice-net/sluice/cni/endpointapi"
	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

// The tiered world: two namespaces, four dual-stack pods with service
// accounts, a global and a namespaced network set, and outside addresses
// in them and beside them. Random tiered policies over it are decided by
// the evaluator and traced through the rendered rules.
type tierWorld struct {
	pods    []*Pod
	nss     map[string]*Namespace
	netsets []*NetworkSet
	outside []netip.Addr
}

func newTierWorld() *tierWorld {
	w := &tierWorld{nss: map[string]*Namespace{
		"x": {Name: "x", Labels: labels.Set{"ns": "x", "team": "red"}},
		"y": {Name: "y", Labels: labels.Set{"ns": "y", "team": "blue"}},
	}}
	i := 0
	for _, ns := range []string{"x", "y"} {
		for _, name := range []string{"a", "b"} {
			i++
			role := map[string]string{"a": "db", "b": "web"}[name]
			w.pods = append(w.pods, &Pod{
				Namespace: ns, Name: name, Labels: labels.Set{"pod": name, "role": role},
				IPs:            []netip.Addr{netip.AddrFrom4([4]byte{10, 244, byte(i), 2}), netip.MustParseAddr(fmt.Sprintf("fd00:10:244:%d::2", i))},
				NamedPorts:     map[string]NamedPort{"http": {TCP, 80}, "dns": {UDP, 53}},
				ServiceAccount: "sa-" + name, ServiceAccountLabels: labels.Set{"sa": name},
			})
		}
	}
	w.netsets = []*NetworkSet{
		{Key: "global/ext", Labels: labels.Set{"kind": "ext"},
			Nets: []netip.Prefix{netip.MustParsePrefix("198.18.0.0/24"), netip.MustParsePrefix("2001:db8::/64")}},
		{Key: "x/partners", Namespace: "x", Labels: labels.Set{"kind": "partner"},
			Nets: []netip.Prefix{netip.MustParsePrefix("198.19.0.0/16"), netip.MustParsePrefix("2001:db9::/32")}},
	}
	for _, a := range []string{"198.18.0.254", "198.19.1.1", "203.0.113.1", "2001:db8::fe", "2001:db9::1", "2001:db7::1"} {
		w.outside = append(w.outside, netip.MustParseAddr(a))
	}
	return w
}

// tierGen makes random tiered policies.
type tierGen struct {
	rnd   *rand.Rand
	tiers []*Tier
}

func (g *tierGen) pick(n int) int { return g.rnd.Intn(n) }

func (g *tierGen) calico(s string) Selector {
	sel, err := ParseCalicoSelector(s)
	if err != nil {
		panic(err)
	}
	return sel
}

var testCalicoSelectors = []string{
	"all()", "role == 'db'", "role != 'db'", "pod in {'a'}", "has(role)", "!has(canary)",
	"kind == 'ext'", "kind == 'partner'", "pod == 'b' || kind == 'ext'", "kind not in {'ext'}",
}

func (g *tierGen) peer(ns string) *PodPeer {
	pp := &PodPeer{Namespace: ns, Pods: g.calico(testCalicoSelectors[g.pick(len(testCalicoSelectors))]), NetworkSets: true}
	switch g.pick(5) {
	case 0:
		pp.Namespaces = g.calico("team == 'red'")
	case 1:
		pp.Namespaces, pp.Global = labels.Everything(), true
	case 2:
		pp.OnlyGlobal, pp.Global = true, true
	}
	if ns == "" && pp.Namespaces == nil && !pp.OnlyGlobal {
		pp.Namespaces, pp.Global = labels.Everything(), true // a global policy's selector sees every namespace
	}
	if g.pick(6) == 0 {
		pp.ServiceAccounts = &ServiceAccountMatch{Names: []string{"sa-a"}}
	}
	return pp
}

func (g *tierGen) nets() []netip.Prefix {
	all := []string{"198.18.0.0/24", "10.244.1.0/24", "0.0.0.0/0", "2001:db8::/64", "fd00:10:244:1::/64", "::/0", "203.0.113.0/24"}
	var out []netip.Prefix
	for n := g.pick(2) + 1; n > 0; n-- {
		out = append(out, netip.MustParsePrefix(all[g.pick(len(all))]))
	}
	return out
}

func (g *tierGen) ports(proto Protocol) []Port {
	var out []Port
	for n := g.pick(2) + 1; n > 0; n-- {
		switch g.pick(4) {
		case 0:
			out = append(out, Port{Protocol: proto, Number: 80})
		case 1:
			out = append(out, Port{Protocol: proto, Number: 53, EndPort: 81})
		case 2:
			out = append(out, Port{Protocol: proto, Name: []string{"http", "dns"}[g.pick(2)]})
		default:
			out = append(out, Port{Protocol: proto, Number: 1000})
		}
	}
	return out
}

func (g *tierGen) match(m *Match, ns string, proto Protocol, dst bool) {
	if g.pick(3) == 0 {
		m.Nets = g.nets()
	}
	if g.pick(4) == 0 {
		m.NotNets = g.nets()
	}
	if g.pick(3) == 0 {
		m.Selector = g.peer(ns)
	}
	if g.pick(5) == 0 {
		m.NotSelector = g.peer(ns)
	}
	if proto == TCP || proto == UDP {
		if g.pick(2) == 0 && dst || g.pick(6) == 0 {
			m.Ports = g.ports(proto)
		}
		if g.pick(5) == 0 {
			m.NotPorts = g.ports(proto)
		}
	}
}

func (g *tierGen) rule(ns string) Rule {
	r := Rule{Action: []Action{Allow, Allow, Deny, Pass, Log}[g.pick(5)]}
	r.Protocol = []Protocol{"", TCP, UDP, ICMP, ICMPv6}[g.pick(5)]
	if r.Protocol == "" && g.pick(4) == 0 {
		r.NotProtocol = UDP
	}
	if isICMP(r.Protocol) && g.pick(2) == 0 {
		typ := int32(8)
		if r.Protocol == ICMPv6 {
			typ = 128
		}
		m := &ICMPMatch{Type: typ, Code: []int32{-1, 0, 1}[g.pick(3)]}
		if g.pick(2) == 0 {
			r.ICMP = m
		} else {
			r.NotICMP = m
		}
	}
	if g.pick(5) == 0 {
		r.IPVersion = []int{4, 6}[g.pick(2)]
	}
	if g.pick(6) == 0 {
		// A NetworkPolicy-style peer list.
		r.Src.Peers = []Peer{{Pods: &PodPeer{Namespace: ns, Pods: labels.SelectorFromSet(labels.Set{"pod": "a"}), Namespaces: labels.Everything()}},
			{CIDR: netip.MustParsePrefix("198.18.0.0/16"), Except: []netip.Prefix{netip.MustParsePrefix("198.18.0.0/24")}}}
	}
	g.match(&r.Src, ns, r.Protocol, false)
	g.match(&r.Dst, ns, r.Protocol, true)
	return r
}

func (g *tierGen) policy(i int) *Policy {
	ns := []string{"x", "y", ""}[g.pick(3)]
	p := &Policy{Key: fmt.Sprintf("p%d", i), Name: fmt.Sprintf("p%d", i%4), Tier: g.tiers[g.pick(len(g.tiers))],
		Order: []float64{10, 100, 100, NoOrder}[g.pick(4)], Namespace: ns,
		PodSelector: g.calico(testCalicoSelectors[g.pick(6)])}
	if ns == "" && g.pick(2) == 0 {
		p.NamespaceSelector = g.calico("team == 'red'")
	}
	if g.pick(8) == 0 {
		p.ServiceAccounts = &ServiceAccountMatch{Selector: g.calico("sa == 'b'")}
	}
	switch g.pick(3) {
	case 0:
		p.Ingress = true
	case 1:
		p.Egress = true
	default:
		p.Ingress, p.Egress = true, true
	}
	p.Staged = g.pick(8) == 0
	for n := g.pick(4); n > 0; n-- {
		if p.Ingress {
			p.IngressRules = append(p.IngressRules, g.rule(ns))
		}
		if p.Egress {
			p.EgressRules = append(p.EgressRules, g.rule(ns))
		}
	}
	return p
}

func newTierGen(seed int64) *tierGen {
	g := &tierGen{rnd: rand.New(rand.NewSource(seed))}
	g.tiers = []*Tier{
		{Name: "security", Order: 100, DefaultAction: []Action{Deny, Pass}[g.pick(2)]},
		DefaultTier(),
		{Name: "after", Order: NoOrder, DefaultAction: []Action{Deny, Pass}[g.pick(2)]},
	}
	return g
}

// tierFlow is one flow of the tiered world, as the evaluator and the
// tracer see it.
type tierFlow struct {
	flow Flow
	pkt  packet
}

func (w *tierWorld) veth(p *Pod) string { return vethOf(p.Namespace + "/" + p.Name) }

func (w *tierWorld) endpoint(p *Pod, ipv6 bool) Endpoint {
	ip := p.IPs[0]
	if ipv6 {
		ip = p.IPs[1]
	}
	return Endpoint{Pod: p, Namespace: w.nss[p.Namespace], IP: ip}
}

// flows lists every pod pair and every pod with every outside address,
// both ways, over a few protocols, ports and ICMP types.
func (w *tierWorld) flows(ipv6 bool) []tierFlow {
	type kind struct {
		proto        Protocol
		sport, dport int32
		typ, code    int32
	}
	icmp, echo, other := ICMP, int32(8), int32(13)
	if ipv6 {
		icmp, echo, other = ICMPv6, 128, 1
	}
	kinds := []kind{{TCP, 1000, 80, 0, 0}, {TCP, 40000, 1000, 0, 0}, {UDP, 53, 53, 0, 0}, {UDP, 40000, 81, 0, 0},
		{icmp, 0, 0, echo, 0}, {icmp, 0, 0, echo, 1}, {icmp, 0, 0, other, 0}}
	var ends [][2]Endpoint
	for _, a := range w.pods {
		for _, b := range w.pods {
			if a != b {
				ends = append(ends, [2]Endpoint{w.endpoint(a, ipv6), w.endpoint(b, ipv6)})
			}
		}
		for _, o := range w.outside {
			if o.Is6() == ipv6 {
				ends = append(ends, [2]Endpoint{w.endpoint(a, ipv6), {IP: o}}, [2]Endpoint{{IP: o}, w.endpoint(a, ipv6)})
			}
		}
	}
	var out []tierFlow
	for _, e := range ends {
		for _, k := range kinds {
			f := Flow{Src: e[0], Dst: e[1], Proto: k.proto, SrcPort: k.sport, DstPort: k.dport, ICMPType: k.typ, ICMPCode: k.code}
			p := packet{src: e[0].IP, dst: e[1].IP, proto: k.proto, sport: k.sport, dport: k.dport, icmpType: k.typ, icmpCode: k.code}
			if e[0].Pod != nil {
				p.in = w.veth(e[0].Pod)
			}
			if e[1].Pod != nil {
				p.out = w.veth(e[1].Pod)
			}
			out = append(out, tierFlow{f, p})
		}
	}
	return out
}

func (w *tierWorld) render(pols []*Policy, ipv6 bool) *Ruleset {
	m := map[string]*Policy{}
	for _, p := range pols {
		m[p.Key] = p
	}
	var eps []LocalEndpoint
	for _, pod := range w.pods {
		in, out := Selecting(m, pod, w.nss[pod.Namespace])
		eps = append(eps, LocalEndpoint{Pod: pod, HostVeth: w.veth(pod), Ingress: in, Egress: out})
	}
	return (&Renderer{IPv6: ipv6, AcceptMark: 0x10000}).RenderWithSets(m, eps, w.pods, w.nss, w.netsets)
}

// traceForward plays package forward's chains for a packet: the sender's
// egress, then the receiver's ingress. It returns whether the packet
// passes and the NFLOG prefixes it was logged with.
func traceForward(t *testing.T, rs *Ruleset, p *packet) (bool, []string) {
	var logs []string
	for _, hop := range []struct {
		iface, chain string
	}{{p.in, contract.FromPodChain}, {p.out, contract.ToPodChain}} {
		if !strings.HasPrefix(hop.iface, "sl") {
			continue
		}
		tr := &tracer{t: t, rs: rs}
		v := tr.run(hop.chain, p, 0)
		logs = append(logs, tr.logs...)
		if v == verdictDrop {
			return false, logs
		}
	}
	return true, logs
}

// expectedLogs is what the evaluator says the rules log: the egress
// side's Log rules, then, when egress allowed it, the ingress side's.
func expectedLogs(_ []*Policy, v Verdict, f Flow) []string {
	var out []string
	if f.Src.Pod != nil {
		for _, h := range v.Egress.Logged {
			out = append(out, LogPrefix(h.Policy, true, h.Rule))
		}
		if !v.Egress.Allowed {
			return out
		}
	}
	if f.Dst.Pod != nil {
		for _, h := range v.Ingress.Logged {
			out = append(out, LogPrefix(h.Policy, false, h.Rule))
		}
	}
	return out
}

// disagreements counts the flows whose traced verdict or logs differ from
// the evaluator's, and describes the first.
func (w *tierWorld) disagreements(t *testing.T, pols []*Policy, rs *Ruleset, ipv6 bool) (int, string) {
	e := &Evaluator{Policies: pols, NetworkSets: w.netsets, Namespaces: w.nss}
	n, first := 0, ""
	for _, fl := range w.flows(ipv6) {
		v := e.Verdict(fl.flow)
		got, logs := traceForward(t, rs, &fl.pkt)
		want := expectedLogs(pols, v, fl.flow)
		if got != v.Allowed() || !slices.Equal(logs, want) {
			if n == 0 {
				first = fmt.Sprintf("%s -> %s %s sport %d dport %d icmp %d/%d: rules allow=%v logs %v, evaluator %+v logs %v",
					fl.pkt.src, fl.pkt.dst, fl.pkt.proto, fl.pkt.sport, fl.pkt.dport, fl.pkt.icmpType, fl.pkt.icmpCode, got, logs, v, want)
			}
			n++
		}
	}
	return n, first
}

// TestTieredRulesAgreeWithTheEvaluator renders random tiered policies
// (every action, tier default actions Deny and Pass, staged policies,
// Calico selectors over pods and network sets, nets and notNets, ports
// and notPorts on both ends, ICMP types and codes, IP versions) and
// traces every flow of the world through the rules, in both families:
// verdicts and NFLOG records must be the evaluator's.
func TestTieredRulesAgreeWithTheEvaluator(t *testing.T) {
	w := newTierWorld()
	for seed := int64(1); seed <= 150; seed++ {
		g := newTierGen(seed)
		var pols []*Policy
		for i := g.pick(6) + 1; i > 0; i-- {
			pols = append(pols, g.policy(i))
		}
		for _, ipv6 := range []bool{false, true} {
			if n, first := w.disagreements(t, pols, w.render(pols, ipv6), ipv6); n > 0 {
				t.Fatalf("seed %d ipv6=%v: %d flows disagree; first: %s", seed, ipv6, n, first)
			}
		}
	}
}

// tierMutations are wrong renderings the tracer check must catch: each
// breaks one piece of the tiered design.
var tierMutations = map[string]func(rs *Ruleset) bool{
	"Deny returns instead of dropping": func(rs *Ruleset) bool {
		return mutateFirst(rs, "SLUICE-P", "-j DROP", "-j RETURN")
	},
	"no end-of-tier drop": func(rs *Ruleset) bool {
		return dropFirst(rs, "SLUICE-TW-", "end of tier")
	},
	"Pass accepts": func(rs *Ruleset) bool {
		return mutateFirst(rs, "SLUICE-P", "-j MARK --set-xmark 0x20000/0x20000", "-j MARK --set-xmark 0x10000/0x10000")
	},
	"the pass mark is not cleared for the next tier": func(rs *Ruleset) bool {
		return dropFirst(rs, "SLUICE-FW-", "-m comment --comment \"tier ")
	},
	"a notNets or notSelector set match is not negated": func(rs *Ruleset) bool {
		return mutateFirst(rs, "SLUICE-P", "-m set ! --match-set", "-m set --match-set")
	},
	"a single notNet is not negated": func(rs *Ruleset) bool {
		return mutateFirst(rs, "SLUICE-P", " ! -s ", " -s ")
	},
}

func mutateFirst(rs *Ruleset, chainPrefix, old, repl string) bool {
	for _, name := range sortedChains(rs, chainPrefix) {
		for i, r := range rs.Chains[name] {
			if strings.Contains(r, old) {
				rs.Chains[name] = slices.Clone(rs.Chains[name])
				rs.Chains[name][i] = strings.Replace(r, old, repl, 1)
				return true
			}
		}
	}
	return false
}

func dropFirst(rs *Ruleset, chainPrefix, has string) bool {
	for _, name := range sortedChains(rs, chainPrefix) {
		for i, r := range rs.Chains[name] {
			if strings.Contains(r, has) {
				rs.Chains[name] = slices.Delete(slices.Clone(rs.Chains[name]), i, i+1)
				return true
			}
		}
	}
	return false
}

func sortedChains(rs *Ruleset, prefix string) []string {
	var out []string
	for name := range rs.Chains {
		if strings.HasPrefix(name, prefix) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// TestTieredTracerCatchesMutations is the control of the check above:
// each wrong rendering, applied to the same random worlds, makes some
// flow disagree with the evaluator.
func TestTieredTracerCatchesMutations(t *testing.T) {
	w := newTierWorld()
	for name, mutate := range tierMutations {
		caught := false
		for seed := int64(1); seed <= 150 && !caught; seed++ {
			g := newTierGen(seed)
			var pols []*Policy
			for i := g.pick(6) + 1; i > 0; i-- {
				pols = append(pols, g.policy(i))
			}
			rs := w.render(pols, false)
			if !mutate(rs) {
				continue
			}
			n, _ := w.disagreements(t, pols, rs, false)
			caught = n > 0
		}
		if !caught {
			t.Errorf("mutation %q went unnoticed in every world", name)
		}
	}
}

// TestIncrementalTieredMatchesFullRender holds the loop's incremental
// state equal to a render from scratch while tiered policies come, go,
// change order and tier, tiers change their default action, network sets
// and namespace labels change.
func TestIncrementalTieredMatchesFullRender(t *testing.T) {
	for seed := int64(1); seed <= 30; seed++ {
		w := newTierWorld()
		g := newTierGen(seed)
		renderers := []*Renderer{{AcceptMark: 0x10000}, {IPv6: true, AcceptMark: 0x10000}}
		s := newClusterState(renderers)
		eps := map[string]endpointapi.Endpoint{}
		for _, p := range w.pods {
			s.SetPod(p.Namespace+"/"+p.Name, p)
			var ips []string
			for _, ip := range p.IPs {
				ips = append(ips, ip.String())
			}
			key := "c-" + p.Namespace + "-" + p.Name + "/eth0"
			eps[key] = endpointapi.Endpoint{ContainerID: "c-" + p.Namespace + "-" + p.Name, IfName: "eth0", Namespace: p.Namespace, Pod: p.Name, HostVeth: w.veth(p), IPs: ips}
		}
		s.SetEndpoints(eps)
		for _, ns := range w.nss {
			s.SetNamespace(ns.Name, ns)
		}
		for _, ns := range w.netsets {
			s.SetNetworkSet(ns.Key, ns)
		}
		pols := map[string]*Policy{}
		for step := 0; step < 60; step++ {
			for n := g.pick(3) + 1; n > 0; n-- {
				w.tieredChange(g, s, pols)
			}
			got := s.Commit()
			var list []*Policy
			for _, p := range pols {
				list = append(list, p)
			}
			for i, r := range renderers {
				if diff := rulesetDiff(got[i], w.render(list, r.IPv6)); diff != "" {
					t.Fatalf("seed %d step %d ipv6=%v: incremental state differs from a full render: %s", seed, step, r.IPv6, diff)
				}
			}
		}
	}
}

// tieredChange makes one random change to the world and the state.
func (w *tierWorld) tieredChange(g *tierGen, s *clusterState, pols map[string]*Policy) {
	switch g.pick(6) {
	case 0, 1: // a new or changed policy: new rules, order, tier
		p := g.policy(g.pick(8))
		pols[p.Key] = p
		s.SetPolicy(p.Key, p)
	case 2:
		k := fmt.Sprintf("p%d", g.pick(8))
		delete(pols, k)
		s.SetPolicy(k, nil)
	case 3: // a tier's default action flips: its policies are converted again
		tier := g.tiers[g.pick(len(g.tiers))]
		nt := *tier
		nt.DefaultAction = map[Action]Action{Deny: Pass, Pass: Deny}[tier.DefaultAction]
		for i := range g.tiers {
			if g.tiers[i] == tier {
				g.tiers[i] = &nt
			}
		}
		for k, p := range pols {
			if p.Tier == tier {
				c := *p
				c.Tier = &nt
				pols[k] = &c
				s.SetPolicy(k, &c)
			}
		}
	case 4: // a network set's nets change
		i := g.pick(len(w.netsets))
		ns := *w.netsets[i]
		ns.Nets = g.nets()
		w.netsets[i] = &ns
		s.SetNetworkSet(ns.Key, &ns)
	default: // a namespace's labels change
		name := []string{"x", "y"}[g.pick(2)]
		team := []string{"red", "blue"}[g.pick(2)]
		ns := &Namespace{Name: name, Labels: labels.Set{"ns": name, "team": team}}
		w.nss[name] = ns
		s.SetNamespace(name, ns)
	}
}

// TestTieredRulesLoadAndReadBack writes random tiered rulesets into a
// real kernel, both families: every rule must load, and a fresh writer
// over the same kernel must find nothing to change, so the rules are
// rendered in iptables-save's own form (NFLOG, ICMP, multiport, negated
// sets and protocols included).
func TestTieredRulesLoadAndReadBack(t *testing.T) {
	n := nettest.NewNS(t)
	w := newTierWorld()
	nettest.Do(t, n, func() error {
		for seed := int64(1); seed <= 25; seed++ {
			g := newTierGen(seed)
			var pols []*Policy
			for i := 0; i < 6; i++ {
				pols = append(pols, g.policy(i))
			}
			for _, ipv6 := range []bool{false, true} {
				fam := iptables.IPv4
				if ipv6 {
					fam = iptables.IPv6
				}
				r, err := iptables.New(fam, iptables.ModeNFT)
				if err != nil {
					return err
				}
				d := NewDataplane(r, ipv6)
				rs := w.render(pols, ipv6)
				st, err := d.Apply(rs)
				if err != nil || len(st.Failed) > 0 {
					return fmt.Errorf("seed %d ipv6=%v: %v %+v", seed, ipv6, err, st.Failed)
				}
				if st, err := NewDataplane(r, ipv6).Apply(rs); err != nil || st.ChainsWritten+st.SetsChanged != 0 {
					if k, err := NewDataplane(r, ipv6).Read(); err == nil {
						for name, rules := range rs.Chains {
							if !slices.Equal(k.chains[name], rules) {
								t.Errorf("%s:\n rendered %q\n in kernel %q", name, rules, k.chains[name])
							}
						}
					}
					t.Fatalf("seed %d ipv6=%v: re-apply over the kernel changed %+v (%v)", seed, ipv6, st, err)
				}
				if err := d.Remove(); err != nil {
					return err
				}
			}
		}
		return nil
	})
}

// TestProtocolNumbersReadBack: a rule with a protocol by number loads and
// reads back unchanged (iptables-save prints the name /etc/protocols
// gives the number).
func TestProtocolNumbersReadBack(t *testing.T) {
	n := nettest.NewNS(t)
	w := newTierWorld()
	sel, _ := ParseCalicoSelector("all()")
	p := &Policy{Key: "proto", Name: "proto", Namespace: "x", PodSelector: sel, Ingress: true,
		IngressRules: []Rule{{Action: Deny, Protocol: "47"}, {Action: Allow, NotProtocol: "132"}, {Action: Allow, Protocol: "253"}}}
	nettest.Do(t, n, func() error {
		r, err := iptables.New(iptables.IPv4, iptables.ModeNFT)
		if err != nil {
			return err
		}
		rs := w.render([]*Policy{p}, false)
		d := NewDataplane(r, false)
		if _, err := d.Apply(rs); err != nil {
			return err
		}
		if st, err := NewDataplane(r, false).Apply(rs); err != nil || st.ChainsWritten != 0 {
			t.Errorf("re-apply changed %+v (%v): %q", st, err, rs.Chains[PolicyChain("proto", false)])
		}
		return d.Remove()
	})
}
