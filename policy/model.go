package policy

// This file is the normalised model every source of policy is converted
// into, and the reference semantics (Allowed) that the rendered rules must
// agree with. The model quotes the API reference where a branch implements
// it.

import (
	"net/netip"
	"sort"

	"k8s.io/apimachinery/pkg/labels"
)

// Protocol is a transport protocol.
type Protocol string

const (
	TCP  Protocol = "TCP"
	UDP  Protocol = "UDP"
	SCTP Protocol = "SCTP"
)

// Port matches destination ports. Exactly one of Number (with EndPort for
// a range) or Name is set; with neither, all ports of Protocol match.
type Port struct {
	Protocol Protocol
	Number   int32
	EndPort  int32
	// Name is resolved against the destination pod's containerPorts.
	Name string
}

// PodPeer selects pods. "If namespaceSelector is also set, then the
// NetworkPolicyPeer as a whole selects the pods matching podSelector in the
// Namespaces selected by NamespaceSelector. Otherwise it selects the pods
// matching podSelector in the policy's own Namespace."
type PodPeer struct {
	// Namespaces selects namespaces by label; nil means only Namespace.
	Namespaces labels.Selector
	// Namespace is the policy's own namespace, used when Namespaces is nil.
	Namespace string
	// Pods selects pods by label; labels.Everything() for all.
	Pods labels.Selector
}

// Peer is one entry of a rule's from/to list: pods or an IP block.
type Peer struct {
	Pods   *PodPeer
	CIDR   netip.Prefix
	Except []netip.Prefix
}

// Rule allows traffic from (ingress) or to (egress) its peers on its ports.
// "If this field is empty or missing, this rule matches all sources
// (traffic not restricted by source)"; likewise for ports.
type Rule struct {
	Peers []Peer // nil: every peer
	Ports []Port // nil: every port
}

// Policy is one network policy, normalised.
type Policy struct {
	// Key is unique per source: "namespace/name" for networking/v1.
	Key       string
	Namespace string
	// PodSelector selects the policy's pods in Namespace.
	PodSelector labels.Selector
	// Ingress and Egress say which directions the policy isolates
	// (policyTypes after defaulting).
	Ingress, Egress bool
	IngressRules    []Rule
	EgressRules     []Rule
	// Broken is set when the source could not be translated; the policy
	// then isolates its pods and allows nothing (fail closed).
	Broken string
}

// Pod is what the policy loop knows of a pod.
type Pod struct {
	Namespace string
	Name      string
	Labels    labels.Set
	IPs       []netip.Addr
	// NamedPorts maps containerPort names to protocol and number.
	NamedPorts map[string]NamedPort
}

// NamedPort is a named containerPort.
type NamedPort struct {
	Protocol Protocol
	Number   int32
}

// Namespace is what the policy loop knows of a namespace.
type Namespace struct {
	Name   string
	Labels labels.Set
}

// Selects reports whether the policy applies to the pod.
func (p *Policy) Selects(pod *Pod) bool {
	return pod.Namespace == p.Namespace && p.PodSelector.Matches(pod.Labels)
}

// Matches reports whether a pod peer selects a pod in a namespace.
func (pp *PodPeer) Matches(pod *Pod, ns *Namespace) bool {
	if pp.Namespaces == nil {
		if pod.Namespace != pp.Namespace {
			return false
		}
	} else if ns == nil || !pp.Namespaces.Matches(ns.Labels) {
		return false
	}
	return pp.Pods.Matches(pod.Labels)
}

// matchesIP reports whether an IP block peer contains ip: "except is a
// slice of CIDRs that should not be included within an IPBlock".
func (p *Peer) matchesIP(ip netip.Addr) bool {
	if !p.CIDR.IsValid() || !p.CIDR.Contains(ip) {
		return false
	}
	for _, e := range p.Except {
		if e.Contains(ip) {
			return false
		}
	}
	return true
}

// matches reports whether a rule port matches a destination port of a
// destination pod.
func (pt *Port) matches(proto Protocol, port int32, dst *Pod) bool {
	if pt.Protocol != proto {
		return false
	}
	switch {
	case pt.Name != "":
		if dst == nil {
			return false // a named port needs a pod to resolve against
		}
		np, ok := dst.NamedPorts[pt.Name]
		return ok && np.Protocol == proto && np.Number == port
	case pt.Number == 0:
		return true
	case pt.EndPort != 0:
		return port >= pt.Number && port <= pt.EndPort
	default:
		return port == pt.Number
	}
}

func (r *Rule) portAllowed(proto Protocol, port int32, dst *Pod) bool {
	if r.Ports == nil {
		return true
	}
	for i := range r.Ports {
		if r.Ports[i].matches(proto, port, dst) {
			return true
		}
	}
	return false
}

// Endpoint is one side of a flow: a pod (with its namespace) or an address
// outside the cluster's pods.
type Endpoint struct {
	Pod       *Pod
	Namespace *Namespace
	IP        netip.Addr
}

func (r *Rule) peerAllowed(peer Endpoint) bool {
	if r.Peers == nil {
		return true
	}
	for i := range r.Peers {
		p := &r.Peers[i]
		if p.Pods != nil {
			if peer.Pod != nil && p.Pods.Matches(peer.Pod, peer.Namespace) {
				return true
			}
			continue
		}
		// "IPBlock describes a particular CIDR ... that is allowed"; it
		// matches pods too, by their IP.
		if p.matchesIP(peer.IP) {
			return true
		}
	}
	return false
}

// Allowed is the reference semantics: whether a connection from src to
// dst on proto/port is allowed by the policies. Egress is decided for src,
// ingress for dst; a pod no policy selects in a direction is open in it;
// several policies add up.
func Allowed(policies []*Policy, src, dst Endpoint, proto Protocol, port int32) bool {
	// "Pods cannot currently block localhost access": a pod reaching its
	// own address never leaves its namespace, so no policy applies.
	if src.Pod != nil && src.Pod == dst.Pod {
		return true
	}
	return allowedDir(policies, src, dst, proto, port, true) && allowedDir(policies, dst, src, proto, port, false)
}

// allowedDir decides one direction for the local pod `self` talking to
// `peer`; egress means self sends to peer on peer's port.
func allowedDir(policies []*Policy, self, peer Endpoint, proto Protocol, port int32, egress bool) bool {
	if self.Pod == nil {
		return true // not a pod: no policy applies to it
	}
	isolated := false
	for _, p := range policies {
		if !p.Selects(self.Pod) {
			continue
		}
		if (egress && !p.Egress) || (!egress && !p.Ingress) {
			continue
		}
		isolated = true
		if p.Broken != "" {
			continue // fails closed: contributes nothing
		}
		rules := p.IngressRules
		dstPod := self.Pod
		if egress {
			rules = p.EgressRules
			dstPod = peer.Pod
		}
		for i := range rules {
			if rules[i].peerAllowed(peer) && rules[i].portAllowed(proto, port, dstPod) {
				return true
			}
		}
	}
	return !isolated
}

// Selecting returns the keys of the policies that select a pod, per
// direction, in a stable order.
func Selecting(policies map[string]*Policy, pod *Pod) (ingress, egress []string) {
	for k, p := range policies {
		if !p.Selects(pod) {
			continue
		}
		if p.Ingress {
			ingress = append(ingress, k)
		}
		if p.Egress {
			egress = append(egress, k)
		}
	}
	sort.Strings(ingress)
	sort.Strings(egress)
	return ingress, egress
}
