package policy

import (
	"fmt"
	"strings"

	"github.com/sluice-net/sluice/internal/contract"
)

// Traffic from a pod to its own node never crosses FORWARD: it ends in
// filter INPUT. Kubernetes NetworkPolicy says "traffic to and from the
// node where a Pod is running is always allowed", so neither it nor
// Calico's tiers ever decide it. ClusterNetworkPolicy has no such
// exception: an Admin Deny to the node's address, a `nodes` peer or a
// `networks` CIDR holds for the pod's own node too (the conformance suite
// checks it). Package forward jumps from the top of INPUT to
// SLUICE-TO-HOST:
//
//	SLUICE-TO-HOST
//	  not from a pod veth: RETURN
//	  IPv6 neighbour discovery: RETURN (the pod must find its gateway)
//	  established, related: RETURN
//	  -i <veth> -g SLUICE-FH-<veth>, for each endpoint a ClusterNetworkPolicy selects
//	  (anything else: RETURN, allowed as before)
//	SLUICE-FH-<veth>: the endpoint's egress chain with only the Admin tier,
//	  and the Baseline tier when no NetworkPolicy or Calico policy selects
//	  the pod (one that does would allow it, so Baseline has no say)
//
// The FH chain jumps to the same shared per-policy chains as the FW
// chain, so it adds one short chain per selected endpoint and no sets.

// HostChain names an endpoint's chain for traffic to its own node.
func HostChain(veth string) string {
	return chainPrefix + "FH-" + strings.TrimPrefix(veth, contract.HostVethPrefix)
}

// hostPolicies returns the egress policies that decide an endpoint's
// traffic to its own node, in order; nil when none does.
func hostPolicies(pols []*Policy) []*Policy {
	var admin, baseline []*Policy
	namespaced := false
	for _, p := range pols {
		switch band := p.tier().Band; {
		case band < 0:
			admin = append(admin, p)
		case band > 0:
			baseline = append(baseline, p)
		default:
			namespaced = true
		}
	}
	if namespaced {
		return admin
	}
	return append(admin, baseline...)
}

// hostChain renders an endpoint's SLUICE-FH chain from the keys of the
// egress policies selecting it; nil when no ClusterNetworkPolicy decides
// its traffic to the node.
func (r *Renderer) hostChain(veth string, keys []string, policies map[string]*Policy) []string {
	pols := hostPolicies(policiesOf(policies, keys))
	if len(pols) == 0 {
		return nil
	}
	return r.endpointRules(HostChain(veth), pols, true)
}

// hostDispatch renders SLUICE-TO-HOST from the endpoints whose FH chain
// rs already holds. Unlike the forwarding dispatch it ends in RETURN: a
// pod's traffic to its node was allowed before Sluice hooked INPUT, and
// stays allowed unless a ClusterNetworkPolicy says otherwise.
func (r *Renderer) hostDispatch(rs *Ruleset, endpoints []LocalEndpoint) {
	top := contract.ToHostChain
	rules := []string{fmt.Sprintf("-A %s ! -i %s -m comment --comment \"not from a pod\" -j RETURN", top, contract.HostVethPrefix+"+")}
	if r.IPv6 {
		rules = append(rules, fmt.Sprintf("-A %s -p ipv6-icmp -m icmp6 --icmpv6-type 133 -m comment --comment \"neighbour discovery, router solicitation\" -j RETURN", top),
			fmt.Sprintf("-A %s -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m comment --comment \"neighbour discovery, solicitation\" -j RETURN", top),
			fmt.Sprintf("-A %s -p ipv6-icmp -m icmp6 --icmpv6-type 136 -m comment --comment \"neighbour discovery, advertisement\" -j RETURN", top))
	}
	rules = append(rules, fmt.Sprintf("-A %s -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN", top))
	for _, ep := range endpoints {
		if _, ok := rs.Chains[HostChain(ep.HostVeth)]; ok {
			rules = append(rules, fmt.Sprintf("-A %s -i %s -g %s", top, ep.HostVeth, HostChain(ep.HostVeth)))
		}
	}
	rs.Chains[top] = rules
}
