package policy

// The reference evaluator: the tiered semantics written from Calico's
// documentation, the one oracle the packet tracer and the conntrack
// cutter ask. It is written for clarity, not speed.
//
// For each direction, the local endpoint of that direction (the source
// for egress, the destination for ingress) is evaluated alone:
//
//   - "Tiers are evaluated in order. Inside a tier, policies go by order
//     (lower first; none = last; ties by name)." The first Allow or Deny
//     of a matching rule decides; Log logs and goes on.
//   - "Pass skips the rest of the tier": evaluation goes on with the next
//     tier.
//   - "If no policy in the tier matches, the tier's default action
//     applies" (Deny, or Pass on to the next tier), but only for an
//     endpoint that at least one policy of the tier selects in that
//     direction; a tier that selects nothing for the endpoint is skipped.
//   - After the last tier, the traffic is allowed: an endpoint no policy
//     selects is open (Kubernetes' profile), and so is one every tier
//     passed on.
//   - Staged policies are never enforced and never end a tier.

import (
	"net/netip"
	"slices"
)

// Endpoint is one side of a flow: a pod (with its namespace) or an address
// outside the cluster's pods.
type Endpoint struct {
	Pod       *Pod
	Namespace *Namespace
	IP        netip.Addr
}

// Flow is one packet's connection, as policy sees it.
type Flow struct {
	Src, Dst         Endpoint
	Proto            Protocol
	SrcPort, DstPort int32
	// ICMPType and ICMPCode are the message's, for ICMP and ICMPv6.
	ICMPType, ICMPCode int32
	// ToOwnNode says Dst is an address of the node Src runs on, which
	// only ClusterNetworkPolicy decides (see hosttraffic.go).
	ToOwnNode bool
}

// Evaluator decides flows by the tiered model.
type Evaluator struct {
	Policies []*Policy
	// NetworkSets are the network sets Calico selectors can select, and
	// Namespaces the namespaces by name (for namespaced network sets).
	NetworkSets []*NetworkSet
	Namespaces  map[string]*Namespace
	// Staged evaluates staged policies as if they were enforced: the
	// verdict they would give.
	Staged bool
}

// Decision is one direction's outcome.
type Decision struct {
	Allowed bool
	// Policy is the key of the policy whose rule decided, "" when the end
	// of a tier or of all tiers did; Tier the tier where it was decided.
	Policy, Tier string
	// Logged lists the Log rules the flow hit, in order.
	Logged []LogHit
}

// LogHit is one Log rule a flow hit: the policy's key and the rule's
// index in its direction.
type LogHit struct {
	Policy string
	Rule   int
}

// Verdict is a flow's outcome in both directions.
type Verdict struct {
	Egress, Ingress Decision
}

// Allowed reports whether both directions allow the flow.
func (v Verdict) Allowed() bool { return v.Egress.Allowed && v.Ingress.Allowed }

// Allowed is the reference semantics for NetworkPolicy-style questions:
// whether a connection from src to dst on proto/port is allowed by the
// policies (no network sets, no ICMP).
func Allowed(policies []*Policy, src, dst Endpoint, proto Protocol, port int32) bool {
	e := &Evaluator{Policies: policies}
	return e.Verdict(Flow{Src: src, Dst: dst, Proto: proto, DstPort: port}).Allowed()
}

// Verdict decides a flow.
func (e *Evaluator) Verdict(f Flow) Verdict {
	// "Pods cannot currently block localhost access": a pod reaching its
	// own address never leaves its namespace, so no policy applies.
	if f.Src.Pod != nil && f.Src.Pod == f.Dst.Pod {
		return Verdict{Egress: Decision{Allowed: true}, Ingress: Decision{Allowed: true}}
	}
	return Verdict{Egress: e.decide(f, true), Ingress: e.decide(f, false)}
}

// decide walks the tiers for one direction's local endpoint.
func (e *Evaluator) decide(f Flow, egress bool) Decision {
	self := f.Dst
	if egress {
		self = f.Src
	}
	if self.Pod == nil {
		return Decision{Allowed: true} // not a pod: no policy applies to it
	}
	var selecting []*Policy
	for _, p := range e.Policies {
		if p.Staged && !e.Staged {
			continue
		}
		if (egress && p.Egress || !egress && p.Ingress) && p.Selects(self.Pod, self.Namespace) {
			selecting = append(selecting, p)
		}
	}
	slices.SortFunc(selecting, comparePolicies)
	if egress && f.ToOwnNode {
		selecting = hostPolicies(selecting)
	}
	var d Decision
	for i := 0; i < len(selecting); {
		tier := selecting[i].tier()
		end := i
		for end < len(selecting) && selecting[end].tier().Name == tier.Name {
			end++
		}
		action, by := e.walkTier(selecting[i:end], f, egress, &d)
		i = end
		switch action {
		case Allow, Deny:
			d.Allowed, d.Policy, d.Tier = action == Allow, by, tier.Name
			return d
		case Pass:
			continue
		}
		if tier.DefaultAction != Pass {
			d.Allowed, d.Tier = false, tier.Name
			return d
		}
	}
	d.Allowed = true
	return d
}

// walkTier applies one tier's policies in order: it returns the action
// that ended the tier (Allow, Deny or Pass) and the policy it came from,
// or "" when no rule decided.
func (e *Evaluator) walkTier(policies []*Policy, f Flow, egress bool, d *Decision) (Action, string) {
	for _, p := range policies {
		rules := p.IngressRules
		if egress {
			rules = p.EgressRules
		}
		for i := range rules {
			r := &rules[i]
			if !e.ruleMatches(r, f) {
				continue
			}
			switch a := r.action(); a {
			case Log:
				d.Logged = append(d.Logged, LogHit{p.Key, i})
			default:
				return a, p.Key
			}
		}
	}
	return "", ""
}

// ruleMatches reports whether every field of a rule holds for the flow.
func (e *Evaluator) ruleMatches(r *Rule, f Flow) bool {
	ip := f.Src.IP
	switch {
	case r.IPVersion == 4 && !ip.Is4(), r.IPVersion == 6 && !ip.Is6():
		return false
	case r.Protocol != "" && r.Protocol != f.Proto:
		return false
	case r.NotProtocol != "" && r.NotProtocol == f.Proto:
		return false
	case r.ICMP != nil && !r.ICMP.matches(f):
		return false
	case r.NotICMP != nil && (!isICMP(f.Proto) || r.NotICMP.matches(f)):
		return false
	}
	return e.endMatches(&r.Src, f.Src, f.Proto, f.SrcPort) && e.endMatches(&r.Dst, f.Dst, f.Proto, f.DstPort)
}

func isICMP(p Protocol) bool { return p == ICMP || p == ICMPv6 }

func (m *ICMPMatch) matches(f Flow) bool {
	return isICMP(f.Proto) && f.ICMPType == m.Type && (m.Code < 0 || f.ICMPCode == m.Code)
}

// endMatches reports whether one end of the flow is what a rule asks.
func (e *Evaluator) endMatches(m *Match, ep Endpoint, proto Protocol, port int32) bool {
	if m.Peers != nil && !slices.ContainsFunc(m.Peers, func(p Peer) bool { return p.matches(ep) }) {
		return false
	}
	if m.Nets != nil && !netsContain(m.Nets, ep.IP) {
		return false
	}
	if netsContain(m.NotNets, ep.IP) {
		return false
	}
	if m.Selector != nil && !e.selects(m.Selector, ep) {
		return false
	}
	if m.NotSelector != nil && e.selects(m.NotSelector, ep) {
		return false
	}
	if m.Ports != nil && !slices.ContainsFunc(m.Ports, func(pt Port) bool { return pt.matches(proto, port, ep.Pod) }) {
		return false
	}
	return !slices.ContainsFunc(m.NotPorts, func(pt Port) bool { return pt.matches(proto, port, ep.Pod) })
}

// selects reports whether a Calico selector selects an end: the pod, or
// a network set holding its address.
func (e *Evaluator) selects(pp *PodPeer, ep Endpoint) bool {
	if ep.Pod != nil && pp.Matches(ep.Pod, ep.Namespace) {
		return true
	}
	for _, s := range e.NetworkSets {
		if netsContain(s.Nets, ep.IP) && pp.MatchesSet(s, e.Namespaces[s.Namespace]) {
			return true
		}
	}
	return false
}

func netsContain(nets []netip.Prefix, ip netip.Addr) bool {
	return slices.ContainsFunc(nets, func(n netip.Prefix) bool { return n.Contains(ip) })
}

// matches reports whether a NetworkPolicy peer selects an end. "IPBlock
// describes a particular CIDR ... that is allowed"; it matches pods too,
// by their IP.
func (p *Peer) matches(ep Endpoint) bool {
	if p.Pods != nil {
		return ep.Pod != nil && p.Pods.Matches(ep.Pod, ep.Namespace)
	}
	return p.matchesIP(ep.IP)
}

// matchesIP reports whether an IP block peer contains ip: "except is a
// slice of CIDRs that should not be included within an IPBlock".
func (p *Peer) matchesIP(ip netip.Addr) bool {
	if !p.CIDR.IsValid() || !p.CIDR.Contains(ip) {
		return false
	}
	return !netsContain(p.Except, ip)
}

// matches reports whether a rule port matches a port of the pod on that
// side of the flow (nil when it is not a pod).
func (pt *Port) matches(proto Protocol, port int32, pod *Pod) bool {
	if pt.Protocol != proto {
		return false
	}
	switch {
	case pt.Name != "":
		if pod == nil {
			return false // a named port needs a pod to resolve against
		}
		np, ok := pod.NamedPorts[pt.Name]
		return ok && np.Protocol == proto && np.Number == port
	case pt.Number == 0:
		return true
	case pt.EndPort != 0:
		return port >= pt.Number && port <= pt.EndPort
	default:
		return port == pt.Number
	}
}

// Selecting returns the keys of the enforced policies that select a pod,
// per direction, in the order they apply (comparePolicies); ns is the
// pod's namespace.
func Selecting(policies map[string]*Policy, pod *Pod, ns *Namespace) (ingress, egress []string) {
	var in, out []*Policy
	for _, p := range policies {
		if p.Staged || !p.Selects(pod, ns) {
			continue
		}
		if p.Ingress {
			in = append(in, p)
		}
		if p.Egress {
			out = append(out, p)
		}
	}
	return orderedKeys(in), orderedKeys(out)
}

func orderedKeys(ps []*Policy) []string {
	slices.SortFunc(ps, comparePolicies)
	var keys []string
	for _, p := range ps {
		keys = append(keys, p.Key)
	}
	return keys
}
