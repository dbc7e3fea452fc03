package policy

// The agent's side of explain: it answers from the model of its last
// sync, and checks that model against the kernel of its node. A rule,
// chain or jump the model wants and the kernel lacks is a bug or drift,
// and the answer says so (Problems), because a verdict from the model
// alone would then be a lie about what the packet meets.

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/sluice-net/sluice/internal/contract"
)

// FlowQuery is what explain is asked: FROM and TO as "namespace/pod", an
// IP or "external:IP"; Port a number or a named port of the destination
// ("" for none); Proto TCP when empty.
type FlowQuery struct {
	From, To string
	Port     string
	Proto    Protocol
}

// Explanation is the agent's answer for both directions of a flow.
type Explanation struct {
	Node     string           `json:"node"`
	From     ExplainedEnd     `json:"from"`
	To       ExplainedEnd     `json:"to"`
	Protocol Protocol         `json:"protocol"`
	Port     int32            `json:"port"`
	PortName string           `json:"portName,omitempty"`
	Egress   DirectionVerdict `json:"egress"`
	Ingress  DirectionVerdict `json:"ingress"`
}

// ExplainedEnd is one end of the flow as the model resolved it.
type ExplainedEnd struct {
	Pod string `json:"pod,omitempty"`
	IP  string `json:"ip"`
	// Local says the pod is an endpoint of the node that answered.
	Local bool `json:"local"`
	// OwnNode says the address is one of the node's own, where the source
	// pod runs: the flow ends in INPUT (hosttraffic.go).
	OwnNode bool `json:"ownNode,omitempty"`
}

// KernelCheck is what the node's kernel holds for one direction's
// endpoint, next to what the model wants.
type KernelCheck struct {
	// EndpointChain is the endpoint's chain of this direction;
	// Programmed says it (and its port tree) is as rendered and the
	// dispatch sends the endpoint's interface to it.
	EndpointChain string `json:"endpointChain"`
	Programmed    bool   `json:"programmed"`
	// DecidingChain holds what decided, DecidingRules its rules there as
	// the kernel has them, and Packets their packet counters: the new
	// connections they decided since they were written.
	DecidingChain string   `json:"decidingChain,omitempty"`
	DecidingRules []string `json:"decidingRules,omitempty"`
	Packets       uint64   `json:"packets"`
	// FailsClosed says why the deciding policy is not programmed on this
	// node as written, when it is not (the status lists these too).
	FailsClosed string `json:"failsClosed,omitempty"`
	// Problems are the disagreements between the model and the kernel.
	Problems []string `json:"problems,omitempty"`
}

// modelSnapshot is the model of the last sync, for questions asked from
// other goroutines; its policies and pods are never changed in place.
type modelSnapshot struct {
	policies   map[string]*Policy
	pods       []*Pod
	namespaces map[string]*Namespace
	locals     []LocalEndpoint
	netsets    []*NetworkSet
	// notProgrammed are the policies that fail closed here, with why.
	notProgrammed map[string]string
	index         *snapshotIndex
}

// saveModel keeps the model of this sync for explain.
func (l *Loop) saveModel() {
	pols, pods, namespaces, locals := l.state.Snapshot()
	l.model.Store(&modelSnapshot{policies: pols, pods: pods, namespaces: namespaces, locals: locals, netsets: l.state.NetworkSets(), index: &snapshotIndex{}})
}

// Explain answers a flow query from the model and checks the local
// endpoints' chains in the kernel.
func (l *Loop) Explain(q FlowQuery) (*Explanation, error) {
	m := l.model.Load()
	if m == nil || l.netns == nil {
		return nil, errors.New("the policy loop has not synced yet")
	}
	snap := *m
	l.mu.Lock()
	snap.notProgrammed = l.status.NotProgrammed // replaced, never changed in place
	l.mu.Unlock()
	m = &snap
	f, x, err := m.resolve(q)
	if err != nil {
		return nil, err
	}
	x.Node = l.cfg.NodeName
	if f.Src.Pod != nil && f.Dst.Pod == nil && m.local(x.From.Pod) != nil {
		own, err := l.ownAddress(f.Dst.IP)
		if err != nil {
			return nil, fmt.Errorf("reading this node's addresses: %w", err)
		}
		f.ToOwnNode, x.To.OwnNode = own, own
	}
	e := &Evaluator{Policies: mapValues(m.policies), NetworkSets: m.netsets, Namespaces: m.namespaces}
	x.Egress, x.Ingress = e.Explain(f, true), e.Explain(f, false)
	for _, dir := range []struct {
		v      *DirectionVerdict
		end    *ExplainedEnd
		egress bool
	}{{&x.Egress, &x.From, true}, {&x.Ingress, &x.To, false}} {
		local := m.local(dir.v.Endpoint)
		dir.end.Local = local != nil
		if local == nil || dir.v.Reason == ReasonSelf {
			continue
		}
		k, err := l.checkKernel(m, local, f, dir.v, dir.egress)
		if err != nil {
			return nil, fmt.Errorf("reading the kernel's rules: %w", err)
		}
		dir.v.Kernel = k
	}
	return x, nil
}

// ownAddress says ip is an address of this node: a pod's packet to it
// ends in filter INPUT rather than being forwarded.
func (l *Loop) ownAddress(ip netip.Addr) (bool, error) {
	var own bool
	err := l.netns.Do(func(ns.NetNS) error {
		addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, a := range addrs {
			if b, ok := netip.AddrFromSlice(a.IP); ok && b.Unmap() == ip.Unmap() {
				own = true
			}
		}
		return nil
	})
	return own, err
}

func mapValues[K comparable, V any](m map[K]V) []V {
	out := make([]V, 0, len(m))
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// resolve turns a query into a flow over the model's pods.
func (m *modelSnapshot) resolve(q FlowQuery) (Flow, *Explanation, error) {
	x := &Explanation{Protocol: q.Proto}
	if x.Protocol == "" {
		x.Protocol = TCP
	}
	src, err := m.endpoint(q.From, netip.Addr{})
	if err != nil {
		return Flow{}, nil, fmt.Errorf("FROM: %w", err)
	}
	dst, err := m.endpoint(q.To, src.IP)
	if err != nil {
		return Flow{}, nil, fmt.Errorf("TO: %w", err)
	}
	if src.Pod != nil && src.IP.Is6() != dst.IP.Is6() {
		// A pod given by name takes the destination's family.
		if src, err = m.endpoint(q.From, dst.IP); err != nil {
			return Flow{}, nil, fmt.Errorf("FROM: %w", err)
		}
	}
	if src.IP.Is6() != dst.IP.Is6() {
		return Flow{}, nil, fmt.Errorf("%s (%s) and %s (%s) have no address of the same family", q.From, src.IP, q.To, dst.IP)
	}
	if x.Port, err = resolvePort(q.Port, x.Protocol, dst.Pod); err != nil {
		return Flow{}, nil, err
	}
	if _, err := strconv.Atoi(q.Port); err != nil && q.Port != "" {
		x.PortName = q.Port
	}
	x.From, x.To = describeEnd(src), describeEnd(dst)
	return Flow{Src: src, Dst: dst, Proto: x.Protocol, DstPort: x.Port}, x, nil
}

func describeEnd(ep Endpoint) ExplainedEnd {
	e := ExplainedEnd{IP: ep.IP.String()}
	if ep.Pod != nil {
		e.Pod = ep.Pod.Namespace + "/" + ep.Pod.Name
	}
	return e
}

// endpoint resolves "namespace/pod", an IP (a pod's, or outside the
// pods) or "external:IP"; a pod's address is of like's family when like
// is valid and the pod has one.
func (m *modelSnapshot) endpoint(s string, like netip.Addr) (Endpoint, error) {
	if rest, ok := strings.CutPrefix(s, "external:"); ok {
		ip, err := netip.ParseAddr(rest)
		if err != nil {
			return Endpoint{}, fmt.Errorf("%q is not external:IP", s)
		}
		return Endpoint{IP: ip}, nil
	}
	if ip, err := netip.ParseAddr(s); err == nil {
		for _, p := range m.pods {
			if slices.Contains(p.IPs, ip) {
				return Endpoint{Pod: p, Namespace: m.namespaces[p.Namespace], IP: ip}, nil
			}
		}
		return Endpoint{IP: ip}, nil
	}
	namespace, name, ok := strings.Cut(s, "/")
	if !ok || namespace == "" || name == "" {
		return Endpoint{}, fmt.Errorf("%q is not namespace/pod, an IP or external:IP", s)
	}
	for _, p := range m.pods {
		if p.Namespace != namespace || p.Name != name {
			continue
		}
		if len(p.IPs) == 0 {
			return Endpoint{}, fmt.Errorf("pod %s has no IP yet", s)
		}
		ep := Endpoint{Pod: p, Namespace: m.namespaces[namespace], IP: p.IPs[0]}
		for _, ip := range p.IPs {
			if like.IsValid() && ip.Is6() == like.Is6() {
				ep.IP = ip
				break
			}
		}
		return ep, nil
	}
	return Endpoint{}, fmt.Errorf("no pod %s with an IP of its own (a hostNetwork pod is its node's IP)", s)
}

// resolvePort takes a port number, or a named port of the destination
// pod; "" is port 0, which no port-restricted rule matches.
func resolvePort(port string, proto Protocol, dst *Pod) (int32, error) {
	if port == "" {
		return 0, nil
	}
	if n, err := strconv.ParseUint(port, 10, 16); err == nil {
		return int32(n), nil
	}
	if dst == nil {
		return 0, fmt.Errorf("named port %q needs a pod as TO", port)
	}
	np, ok := dst.NamedPorts[port]
	if !ok || np.Protocol != proto {
		return 0, fmt.Errorf("pod %s/%s has no %s port named %q", dst.Namespace, dst.Name, proto, port)
	}
	return np.Number, nil
}

// local finds a pod's local endpoint, nil when it is not on this node.
func (m *modelSnapshot) local(pod string) *LocalEndpoint {
	for i := range m.locals {
		if p := m.locals[i].Pod; p != nil && p.Namespace+"/"+p.Name == pod {
			return &m.locals[i]
		}
	}
	return nil
}

// checkKernel reads the filter table of the flow's family and compares the
// endpoint's chains, and the rule that decided, with the model.
func (l *Loop) checkKernel(m *modelSnapshot, ep *LocalEndpoint, f Flow, v *DirectionVerdict, egress bool) (*KernelCheck, error) {
	fam := l.familyOf(f.Src.IP.Is6())
	if fam < 0 {
		return nil, fmt.Errorf("this node does not program IPv6=%v", f.Src.IP.Is6())
	}
	var save string
	err := l.netns.Do(func(ns.NetNS) error {
		var err error
		save, err = l.families[fam].ipt.SaveTable("filter", true)
		return err
	})
	if err != nil {
		return nil, err
	}
	return compareKernel(save, l.state.families[fam].r, m, ep, v, egress), nil // r is set at NewLoop, never changed
}

// compareKernel holds an iptables-save of the filter table (with
// counters) against the model for one direction's local endpoint.
func compareKernel(save string, r *Renderer, m *modelSnapshot, ep *LocalEndpoint, v *DirectionVerdict, egress bool) *KernelCheck {
	keys := ep.Ingress
	if egress {
		keys = ep.Egress
	}
	self := ep.IPs
	if len(self) == 0 && ep.Pod != nil {
		self = ep.Pod.IPs
	}
	k := &KernelCheck{EndpointChain: EndpointChain(ep.HostVeth, egress), Programmed: true}
	if v.ToOwnNode {
		k.EndpointChain = HostChain(ep.HostVeth)
	}
	want := r.endpointChains(ep.HostVeth, self, keys, m.policies, egress)
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range want {
			if !yield(n) {
				return
			}
		}
	})
	for _, chain := range names {
		if d := chainDrift(save, chain, want[chain]); d != "" {
			k.Programmed = false
			k.Problems = append(k.Problems, d)
		}
	}
	switch _, wantHost := want[HostChain(ep.HostVeth)]; {
	case !v.ToOwnNode && !dispatched(save, ep.HostVeth, egress):
		k.Programmed = false
		k.Problems = append(k.Problems, fmt.Sprintf("the dispatch does not send %s to %s", ep.HostVeth, k.EndpointChain))
	case v.ToOwnNode && wantHost != hostDispatched(save, ep.HostVeth):
		k.Programmed = false
		if wantHost {
			k.Problems = append(k.Problems, fmt.Sprintf("%s does not send %s to %s", contract.ToHostChain, ep.HostVeth, k.EndpointChain))
		} else {
			k.Problems = append(k.Problems, fmt.Sprintf("%s sends %s to %s, which no ClusterNetworkPolicy wants", contract.ToHostChain, ep.HostVeth, k.EndpointChain))
		}
	}
	checkDeciding(save, r, m, k, v, egress)
	return k
}

func (l *Loop) familyOf(ipv6 bool) int {
	for i, f := range l.families {
		if f.Is6() == ipv6 {
			return i
		}
	}
	return -1
}

// chainDrift compares a chain in an iptables-save with its rendered rules
// and says how they differ, "" when they agree.
func chainDrift(save, chain string, want []string) string {
	if !hasChain(save, chain) {
		return fmt.Sprintf("chain %s is missing from the kernel", chain)
	}
	got := chainRules(save, chain)
	var missing, extra []string
	for _, w := range want {
		if !slices.Contains(got, w) {
			missing = append(missing, w)
		}
	}
	for _, g := range got {
		if !slices.Contains(want, g) {
			extra = append(extra, g)
		}
	}
	switch {
	case len(missing) > 0:
		return fmt.Sprintf("chain %s lacks %d rule(s) the model wants, first: %s", chain, len(missing), missing[0])
	case len(extra) > 0:
		return fmt.Sprintf("chain %s has %d rule(s) the model does not want, first: %s", chain, len(extra), extra[0])
	case !slices.Equal(got, want):
		return fmt.Sprintf("chain %s holds the model's rules in another order", chain)
	}
	return ""
}

// dispatched reports whether the dispatch tree sends the veth's packets
// to its endpoint chain.
func dispatched(save, veth string, egress bool) bool {
	top, dir := contract.ToPodChain, "-o"
	if egress {
		top, dir = contract.FromPodChain, "-i"
	}
	suffix := strings.TrimPrefix(veth, contract.HostVethPrefix)
	if len(suffix) < dispatchBucket {
		return false
	}
	bucket := top + "-" + suffix[:dispatchBucket]
	return slices.Contains(chainRules(save, top), fmt.Sprintf("-A %s %s %s%s+ -g %s", top, dir, contract.HostVethPrefix, suffix[:dispatchBucket], bucket)) &&
		slices.Contains(chainRules(save, bucket), fmt.Sprintf("-A %s %s %s -g %s", bucket, dir, veth, EndpointChain(veth, egress)))
}

// hostDispatched says SLUICE-TO-HOST sends the veth's traffic to its own
// node to the endpoint's SLUICE-FH chain.
func hostDispatched(save, veth string) bool {
	return slices.Contains(chainRules(save, contract.ToHostChain), fmt.Sprintf("-A %s -i %s -g %s", contract.ToHostChain, veth, HostChain(veth)))
}

// checkDeciding finds what decided in the kernel: the policy rule's
// lines in the policy chain, or the endpoint chain's end-of-tier drop,
// "open" return or "every tier passed" return, with their counters.
func checkDeciding(save string, r *Renderer, m *modelSnapshot, k *KernelCheck, v *DirectionVerdict, egress bool) {
	var chain string
	var want []string
	switch v.Reason {
	case ReasonRule:
		p := m.policies[v.Policy.Key]
		if why, ok := m.notProgrammed[p.Key]; ok {
			k.FailsClosed = why
		}
		chain = PolicyChain(p.Key, egress)
		want = r.ruleTargets(p, egress, v.Rule, chain)
		if want == nil {
			k.Problems = append(k.Problems, fmt.Sprintf("rule %d of %s renders nothing in this family, yet the model says it decided", v.Rule, v.Policy))
			return
		}
	case ReasonEndOfTier, ReasonOpen, ReasonAllPassed:
		chain = k.EndpointChain
		marker := map[string]string{ReasonEndOfTier: "end of tier " + v.Tier + ":", ReasonOpen: "no policy isolates this pod", ReasonAllPassed: "every tier passed it on"}[v.Reason]
		for _, rule := range chainRules(renderedEndpointSave(r, m, k, egress), chain) {
			if strings.Contains(rule, marker) {
				want = append(want, rule)
			}
		}
		if want == nil && v.Reason == ReasonEndOfTier {
			portTreeDrops(save, k, egress)
			return
		}
	default:
		return
	}
	k.DecidingChain = chain
	if !hasChain(save, chain) {
		k.Problems = append(k.Problems, fmt.Sprintf("the deciding chain %s is missing from the kernel", chain))
		return
	}
	rules, counters := chainRulesCounted(save, chain)
	for _, w := range want {
		i := slices.Index(rules, w)
		if i < 0 {
			k.Problems = append(k.Problems, fmt.Sprintf("the deciding rule is missing from the kernel: %s", w))
			continue
		}
		k.DecidingRules = append(k.DecidingRules, w)
		k.Packets += counters[i]
	}
}

// renderedEndpointSave renders an endpoint chain as an iptables-save would
// print it, to look rules up in.
func renderedEndpointSave(r *Renderer, m *modelSnapshot, k *KernelCheck, egress bool) string {
	for _, ep := range m.locals {
		if EndpointChain(ep.HostVeth, egress) != k.EndpointChain && (!egress || HostChain(ep.HostVeth) != k.EndpointChain) {
			continue
		}
		keys, self := ep.Ingress, ep.IPs
		if egress {
			keys = ep.Egress
		}
		if len(self) == 0 && ep.Pod != nil {
			self = ep.Pod.IPs
		}
		return strings.Join(r.endpointChains(ep.HostVeth, self, keys, m.policies, egress)[k.EndpointChain], "\n")
	}
	return ""
}

// ruleTargets renders one rule of a policy as the policy chain holds it:
// its lines with their target; nil when it renders nothing here.
func (r *Renderer) ruleTargets(p *Policy, egress bool, index int, chain string) []string {
	rules, field := p.IngressRules, "spec.ingress"
	if egress {
		rules, field = p.EgressRules, "spec.egress"
	}
	if index < 0 || index >= len(rules) {
		return nil
	}
	lines, _ := r.ruleLines(p, &rules[index], egress, chain, fmt.Sprintf("%s[%d]", field, index))
	target, _ := r.target(p, &rules[index], egress, index)
	out := make([]string, 0, len(lines))
	for _, line := range lines {
		out = append(out, line+" "+target)
	}
	return out
}

// portTreeDrops counts the drops of an endpoint's port tree, where an
// endpoint with many allow-only policies ends its tier (porttree.go):
// the tree and subset chains named after its veth.
func portTreeDrops(save string, k *KernelCheck, egress bool) {
	suffix := strings.TrimPrefix(k.EndpointChain, chainPrefix+map[bool]string{true: "FW-", false: "TW-"}[egress])
	dir := map[bool]string{true: "F", false: "T"}[egress]
	k.DecidingChain = "the port tree of " + k.EndpointChain
	for _, l := range strings.Split(save, "\n") {
		_, rule, ok := strings.Cut(l, "] ")
		if !ok || !strings.Contains(rule, "no policy allowed it") || !strings.HasSuffix(rule, "-j DROP") {
			continue
		}
		f := strings.Fields(rule)
		if len(f) < 2 || !(strings.HasPrefix(f[1], chainPrefix+dir+"T-"+suffix+"-") || strings.HasPrefix(f[1], chainPrefix+dir+"S-"+suffix+"-")) {
			continue
		}
		rules, counters := chainRulesCounted(save, f[1])
		if i := slices.Index(rules, rule); i >= 0 {
			k.DecidingRules = append(k.DecidingRules, rule)
			k.Packets += counters[i]
		}
	}
}
