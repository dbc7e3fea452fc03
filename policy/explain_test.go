package policy

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/labels"
)

// saveOf prints a ruleset as iptables-save -c would, every rule with one
// packet counted, for the kernel comparison.
func saveOf(rs *Ruleset) string {
	var b strings.Builder
	b.WriteString("*filter\n")
	for _, c := range slices.Sorted(func(yield func(string) bool) {
		for n := range rs.Chains {
			if !yield(n) {
				return
			}
		}
	}) {
		fmt.Fprintf(&b, ":%s - [0:0]\n", c)
	}
	for _, c := range slices.Sorted(func(yield func(string) bool) {
		for n := range rs.Chains {
			if !yield(n) {
				return
			}
		}
	}) {
		for _, r := range rs.Chains[c] {
			fmt.Fprintf(&b, "[1:60] %s\n", r)
		}
	}
	return b.String() + "COMMIT\n"
}

// TestExplainAgreesWithTheEvaluatorAndTheRules explains every flow of the
// tiered world under random policies: the verdict is the evaluator's, a
// rule named as deciding matches the flow and has the verdict's action,
// and the kernel comparison over the rendered rules finds the deciding
// rule, with its counter, and no disagreement.
func TestExplainAgreesWithTheEvaluatorAndTheRules(t *testing.T) {
	w := newTierWorld()
	reasons := map[string]int{}
	for seed := int64(1); seed <= 60; seed++ {
		g := newTierGen(seed)
		var pols []*Policy
		for i := g.pick(6) + 1; i > 0; i-- {
			pols = append(pols, g.policy(i))
		}
		e := &Evaluator{Policies: pols, NetworkSets: w.netsets, Namespaces: w.nss}
		m, r := w.snapshot(pols, false)
		save := saveOf(r.RenderWithSets(m.policies, m.locals, m.pods, m.namespaces, m.netsets))
		for _, fl := range w.flows(false) {
			v := e.Verdict(fl.flow)
			for _, egress := range []bool{true, false} {
				x := e.Explain(fl.flow, egress)
				want := v.Ingress
				if egress {
					want = v.Egress
				}
				where := fmt.Sprintf("seed %d %s -> %s %s/%d %s", seed, fl.pkt.src, fl.pkt.dst, fl.flow.Proto, fl.flow.DstPort, x.Direction)
				if x.Allowed != want.Allowed {
					t.Fatalf("%s: explain says allowed=%v, the evaluator %v", where, x.Allowed, want.Allowed)
				}
				reasons[x.Reason]++
				if x.Reason == ReasonRule {
					checkNamedRule(t, where, e, fl.flow, x, egress)
				}
				ep := m.local(x.Endpoint)
				if ep == nil {
					continue
				}
				k := compareKernel(save, r, m, ep, &x, egress)
				if len(k.Problems) > 0 || !k.Programmed {
					t.Fatalf("%s: the kernel check disagrees with rules rendered from the same model: %v", where, k.Problems)
				}
				if x.Reason != ReasonSelf && (len(k.DecidingRules) == 0 || k.Packets == 0) {
					t.Fatalf("%s (%s): no deciding rule found in %s", where, x.Summary, k.DecidingChain)
				}
			}
		}
	}
	for _, r := range []string{ReasonNotAPod, ReasonOpen, ReasonRule, ReasonEndOfTier} {
		if reasons[r] == 0 {
			t.Errorf("no flow was decided by %s; the world does not cover it (%v)", r, reasons)
		}
	}
}

func checkNamedRule(t *testing.T, where string, e *Evaluator, f Flow, x DirectionVerdict, egress bool) {
	t.Helper()
	var p *Policy
	for _, q := range e.Policies {
		if q.Key == x.Policy.Key {
			p = q
		}
	}
	rules := p.IngressRules
	if egress {
		rules = p.EgressRules
	}
	r := &rules[x.Rule]
	if !e.ruleMatches(r, f) || r.action() != x.Action || (x.Action == Allow) != x.Allowed {
		t.Fatalf("%s: explain names %s rule %d (%s), which does not decide the flow that way", where, x.Policy, x.Rule, x.Action)
	}
}

// snapshot is the model an agent holding every pod of the world as a
// local endpoint would explain from.
func (w *tierWorld) snapshot(pols []*Policy, ipv6 bool) (*modelSnapshot, *Renderer) {
	m := &modelSnapshot{policies: map[string]*Policy{}, pods: w.pods, namespaces: w.nss, netsets: w.netsets}
	for _, p := range pols {
		m.policies[p.Key] = p
	}
	for _, pod := range w.pods {
		in, out := Selecting(m.policies, pod, w.nss[pod.Namespace])
		m.locals = append(m.locals, LocalEndpoint{Pod: pod, HostVeth: w.veth(pod), Ingress: in, Egress: out})
	}
	return m, &Renderer{IPv6: ipv6, AcceptMark: 0x10000}
}

// TestExplainReportsDrift is the control: with the deciding rule, the
// endpoint chain or the dispatch jump deleted from the "kernel", the
// check reports the disagreement.
func TestExplainReportsDrift(t *testing.T) {
	w := newTierWorld()
	deny := &Policy{Key: "x/deny", Name: "deny", Namespace: "x", PodSelector: labels.Everything(), Ingress: true}
	allow := &Policy{Key: "x/allow-y", Name: "allow-y", Namespace: "x", PodSelector: labels.Everything(), Ingress: true,
		IngressRules: []Rule{{Src: Match{Peers: []Peer{{Pods: &PodPeer{Namespaces: labels.Everything(), Pods: labels.Everything()}}}}, Dst: Match{Ports: []Port{{Protocol: TCP, Number: 80}}}}}}
	pols := []*Policy{deny, allow}
	m, r := w.snapshot(pols, false)
	rs := r.RenderWithSets(m.policies, m.locals, m.pods, m.namespaces, m.netsets)
	e := &Evaluator{Policies: pols, NetworkSets: w.netsets, Namespaces: w.nss}
	xa, ya := w.pods[0], w.pods[2]
	allowed := Flow{Src: w.endpoint(ya, false), Dst: w.endpoint(xa, false), Proto: TCP, DstPort: 80}
	denied := allowed
	denied.DstPort = 81
	for name, c := range map[string]struct {
		flow    Flow
		reason  string
		mutate  func(rs *Ruleset) bool
		problem string
	}{
		"allow rule deleted": {allowed, ReasonRule, func(rs *Ruleset) bool { return dropFirst(rs, PolicyChain(allow.Key, false), "--dport 80") }, "deciding rule is missing"},
		"end-of-tier drop deleted": {denied, ReasonEndOfTier, func(rs *Ruleset) bool {
			return dropFirst(rs, EndpointChain(w.veth(xa), false), "end of tier")
		}, "lacks 1 rule"},
		"dispatch jump deleted": {denied, ReasonEndOfTier, func(rs *Ruleset) bool { return dropFirst(rs, "SLUICE-TO-POD-", w.veth(xa)) }, "dispatch does not send"},
	} {
		x := e.Explain(c.flow, false)
		if x.Reason != c.reason {
			t.Fatalf("%s: reason %s (%s), want %s", name, x.Reason, x.Summary, c.reason)
		}
		ep := m.local(x.Endpoint)
		if k := compareKernel(saveOf(rs), r, m, ep, &x, false); len(k.Problems) != 0 {
			t.Fatalf("%s: problems before the mutation: %v", name, k.Problems)
		}
		mutated := &Ruleset{Chains: map[string][]string{}}
		for n, rules := range rs.Chains {
			mutated.Chains[n] = slices.Clone(rules)
		}
		if !c.mutate(mutated) {
			t.Fatalf("%s: nothing to mutate", name)
		}
		k := compareKernel(saveOf(mutated), r, m, ep, &x, false)
		if !slices.ContainsFunc(k.Problems, func(p string) bool { return strings.Contains(p, c.problem) }) {
			t.Errorf("%s: problems %v, want one saying %q", name, k.Problems, c.problem)
		}
	}
}

func TestExplainNamesOpenAndIsolated(t *testing.T) {
	w := newTierWorld()
	deny := &Policy{Key: "x/deny", Name: "deny", Namespace: "x", PodSelector: labels.Everything(), Ingress: true}
	e := &Evaluator{Policies: []*Policy{deny}, Namespaces: w.nss}
	f := Flow{Src: w.endpoint(w.pods[2], false), Dst: w.endpoint(w.pods[0], false), Proto: TCP, DstPort: 80}
	if x := e.Explain(f, true); x.Reason != ReasonOpen || !x.Allowed || x.Summary != "no policy selects the pod (open)" {
		t.Errorf("egress of y/a: %+v", x)
	}
	x := e.Explain(f, false)
	if x.Reason != ReasonEndOfTier || x.Allowed || !strings.HasPrefix(x.Summary, "isolated, no rule allowed it") {
		t.Errorf("ingress of x/a: %+v", x)
	}
	if len(x.NotMatched) != 1 || x.NotMatched[0].Key != "x/deny" || x.NotMatched[0].String() != "NetworkPolicy x/deny" {
		t.Errorf("not matched: %+v", x.NotMatched)
	}
}
