package policy

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
	"github.com/sluice-net/sluice/internal/nflog"
)

func (w *tierWorld) renderDropLog(pols []*Policy, ipv6 bool) *Ruleset {
	m := map[string]*Policy{}
	for _, p := range pols {
		m[p.Key] = p
	}
	var eps []LocalEndpoint
	for _, pod := range w.pods {
		in, out := Selecting(m, pod, w.nss[pod.Namespace])
		eps = append(eps, LocalEndpoint{Pod: pod, HostVeth: w.veth(pod), Ingress: in, Egress: out})
	}
	return (&Renderer{IPv6: ipv6, AcceptMark: 0x10000, DropLog: true}).RenderWithSets(m, eps, w.pods, w.nss, w.netsets)
}

// traceDrops plays the sender's egress and the receiver's ingress, and
// returns whether the packet passes, its Log records and its drop logs.
func traceDrops(t *testing.T, rs *Ruleset, p *packet) (bool, []string, []string) {
	var logs, drops []string
	for _, hop := range []struct{ iface, chain string }{{p.in, contract.FromPodChain}, {p.out, contract.ToPodChain}} {
		if !strings.HasPrefix(hop.iface, "sl") {
			continue
		}
		tr := &tracer{t: t, rs: rs}
		v := tr.run(hop.chain, p, 0)
		logs, drops = append(logs, tr.logs...), append(drops, tr.drops...)
		if v == verdictDrop {
			return false, logs, drops
		}
	}
	return true, logs, drops
}

// expectedDrop is the drop log the evaluator says a denied flow gets:
// the deciding Deny rule, or the end of the tier, of the denying side.
func (w *tierWorld) expectedDrop(e *Evaluator, f Flow) []string {
	for _, egress := range []bool{true, false} {
		x := e.Explain(f, egress)
		if x.Allowed {
			continue
		}
		self := f.Dst.Pod
		if egress {
			self = f.Src.Pod
		}
		if x.Policy != nil {
			return []string{DropPrefixRule(x.Policy.Key, egress, x.Rule)}
		}
		return []string{DropPrefixTier(w.veth(self), egress, x.Tier)}
	}
	return nil
}

// TestDropLogsNameWhatDenied traces every flow of the tiered world under
// random policies with drop logging on: verdicts and Log records are as
// without it, a denied new connection is logged once, naming the Deny
// rule or the end of the tier that denied it, and nothing else is.
// Established packets are never drop-logged.
func TestDropLogsNameWhatDenied(t *testing.T) {
	w := newTierWorld()
	denied := 0
	for seed := int64(1); seed <= 100; seed++ {
		g := newTierGen(seed)
		var pols []*Policy
		for i := g.pick(6) + 1; i > 0; i-- {
			pols = append(pols, g.policy(i))
		}
		e := &Evaluator{Policies: pols, NetworkSets: w.netsets, Namespaces: w.nss}
		for _, ipv6 := range []bool{false, true} {
			rs := w.renderDropLog(pols, ipv6)
			for _, fl := range w.flows(ipv6) {
				v := e.Verdict(fl.flow)
				got, logs, drops := traceDrops(t, rs, &fl.pkt)
				want := w.expectedDrop(e, fl.flow)
				if got != v.Allowed() || !slices.Equal(logs, expectedLogs(pols, v, fl.flow)) || !slices.Equal(drops, want) {
					t.Fatalf("seed %d %s -> %s %s/%d: allowed %v logs %v drops %v; evaluator %v logs %v drops %v", seed, fl.pkt.src, fl.pkt.dst,
						fl.flow.Proto, fl.flow.DstPort, got, logs, drops, v.Allowed(), expectedLogs(pols, v, fl.flow), want)
				}
				denied += len(drops)
				est := fl.pkt
				est.state = "ESTABLISHED"
				if _, _, drops := traceDrops(t, rs, &est); len(drops) > 0 {
					t.Fatalf("an established packet was drop-logged: %v", drops)
				}
			}
		}
	}
	if denied == 0 {
		t.Fatal("no flow was denied: the test proves nothing")
	}
}

// TestDropLogsInThePortTree: an endpoint with enough policies for a port
// tree logs the drops of ports no policy allows, with its tier.
func TestDropLogsInThePortTree(t *testing.T) {
	w := newTierWorld()
	var pols []*Policy
	for i := 0; i < DefaultPortTreeThreshold+2; i++ {
		pols = append(pols, &Policy{Key: fmt.Sprintf("x/p%d", i), Name: fmt.Sprintf("p%d", i), Namespace: "x", Order: KubernetesPolicyOrder,
			PodSelector: labels.SelectorFromSet(labels.Set{"pod": "a"}), Ingress: true,
			IngressRules: []Rule{{Dst: Match{Ports: []Port{{Protocol: TCP, Number: int32(8000 + i)}}}}}})
	}
	rs := w.renderDropLog(pols, false)
	if !slices.ContainsFunc(mapKeys(rs.Chains), func(c string) bool { return strings.HasPrefix(c, "SLUICE-TT-") }) {
		t.Fatal("no port tree was rendered")
	}
	xa, yb := w.pods[0], w.pods[3]
	// explain finds the port tree's drops for the end of the tier.
	m, r := w.snapshot(pols, false)
	r.DropLog = true
	e := &Evaluator{Policies: pols, Namespaces: w.nss}
	x := e.Explain(Flow{Src: w.endpoint(yb, false), Dst: w.endpoint(xa, false), Proto: TCP, DstPort: 9000}, false)
	if k := compareKernel(saveOf(rs), r, m, m.local("x/a"), &x, false); x.Reason != ReasonEndOfTier || len(k.Problems) > 0 || len(k.DecidingRules) == 0 || k.Packets == 0 {
		t.Errorf("explain in the port tree: %s, kernel %+v", x.Summary, k)
	}
	for port, wantDrop := range map[int32]bool{8003: false, 9000: true} {
		p := packet{in: w.veth(yb), out: w.veth(xa), src: yb.IPs[0], dst: xa.IPs[0], proto: TCP, sport: 40000, dport: port}
		ok, _, drops := traceDrops(t, rs, &p)
		want := []string(nil)
		if wantDrop {
			want = []string{DropPrefixTier(w.veth(xa), false, DefaultTierName)}
		}
		if ok == wantDrop || !slices.Equal(drops, want) {
			t.Errorf("port %d: allowed %v drops %v, want drops %v", port, ok, drops, want)
		}
	}
}

func mapKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// TestDropLogRulesLoadAndReadBack: rules with drop logs load into a real
// kernel and read back exactly as rendered, so the re-read finds nothing
// to rewrite.
func TestDropLogRulesLoadAndReadBack(t *testing.T) {
	n := nettest.NewNS(t)
	w := newTierWorld()
	nettest.Do(t, n, func() error {
		for seed := int64(1); seed <= 10; seed++ {
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
				rs := w.renderDropLog(pols, ipv6)
				d := NewDataplane(r, ipv6)
				if st, err := d.Apply(rs); err != nil || len(st.Failed) > 0 {
					return fmt.Errorf("seed %d ipv6=%v: %v %+v", seed, ipv6, err, st.Failed)
				}
				if st, err := NewDataplane(r, ipv6).Apply(rs); err != nil || st.ChainsWritten+st.SetsChanged != 0 {
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

func TestParseDropPrefix(t *testing.T) {
	for prefix, want := range map[string]DropReason{
		DropPrefixRule("x/deny", true, 3):                 {Egress: true, PolicyHash: shortHash("x/deny"), Rule: 3},
		DropPrefixTier("sl0123456789a", false, "default"): {VethSuffix: "0123456789a", Tier: "default"},
	} {
		got, ok := ParseDropPrefix(prefix)
		if !ok || got != want {
			t.Errorf("%q: %+v %v, want %+v", prefix, got, ok, want)
		}
	}
	for _, bad := range []string{LogPrefix("x/a", true, 1), "sluice|D|I|abc|x", "other"} {
		if _, ok := ParseDropPrefix(bad); ok {
			t.Errorf("%q parsed as a drop log", bad)
		}
	}
	if p := DropPrefixTier("sl0123456789a", true, strings.Repeat("t", 80)); len(p) > 63 {
		t.Errorf("prefix of %d bytes: NFLOG takes 63", len(p))
	}
}

// AttributeDrop names the local pod, the direction and the Deny rule or
// end of tier from a record's prefix and addresses.
func TestAttributeDrop(t *testing.T) {
	w := newTierWorld()
	deny := &Policy{Key: "NetworkPolicy.projectcalico.org/x/no-db", Name: "no-db", Namespace: "x", Order: 10,
		PodSelector: labels.Everything(), Egress: true, EgressRules: []Rule{{Action: Deny}}}
	m, _ := w.snapshot([]*Policy{deny}, false)
	m.index = &snapshotIndex{}
	l := NewLoop(Config{NodeName: "node-1"}, nil, nil)
	l.model.Store(m)
	xa, yb := w.pods[0], w.pods[3]
	d, ok := l.AttributeDrop(nflog.Record{Prefix: DropPrefixRule(deny.Key, true, 0), Src: xa.IPs[0], Dst: yb.IPs[0], Proto: 6, DstPort: 5432})
	if !ok || d.Pod != "x/a" || d.Direction != "egress" || d.Policy != deny.Key || d.Rule != 0 || d.Protocol != "TCP" ||
		d.Reason != "Deny: tier default, NetworkPolicy.projectcalico.org x/no-db, egress rule 0" {
		t.Errorf("rule drop: %+v", d)
	}
	d, ok = l.AttributeDrop(nflog.Record{Prefix: DropPrefixTier(w.veth(yb), false, "default"), Src: xa.IPs[0], Dst: yb.IPs[0], Proto: 17})
	if !ok || d.Pod != "y/b" || d.Direction != "ingress" || d.Policy != "" || d.Tier != "default" || d.Reason != "isolated, no rule allowed it (end of tier default)" {
		t.Errorf("end-of-tier drop: %+v", d)
	}
	d, ok = l.AttributeDrop(nflog.Record{Prefix: LogPrefix(deny.Key, true, 0), Src: xa.IPs[0], Dst: yb.IPs[0], Proto: 6})
	if !ok || d.Verdict != "logged" || d.Pod != "x/a" || d.Reason != "Log: tier default, NetworkPolicy.projectcalico.org x/no-db, egress rule 0" {
		t.Errorf("a Log rule's record: %+v", d)
	}
	if _, ok := l.AttributeDrop(nflog.Record{Prefix: "someone|else"}); ok {
		t.Error("a foreign NFLOG record was attributed")
	}
}
