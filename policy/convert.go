package policy

import (
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// FromNetworkPolicy converts a networking/v1 NetworkPolicy. A policy that
// cannot be translated is returned with Broken set, selecting what it can:
// it then isolates its pods and allows nothing, never more.
func FromNetworkPolicy(np *networkingv1.NetworkPolicy) *Policy {
	// "Kubernetes NetworkPolicies sit in the default tier at order 1000",
	// where Calico places them; all their rules allow, so inside the tier
	// they add up as the API says.
	p := &Policy{Key: np.Namespace + "/" + np.Name, Name: np.Name, Order: KubernetesPolicyOrder, Namespace: np.Namespace}
	sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
	if err != nil {
		// Whom the policy selects is unknown: fail closed for the whole
		// namespace rather than open anything.
		sel = labels.Everything()
		p.Broken = fmt.Sprintf("spec.podSelector: %v", err)
	}
	p.PodSelector = sel
	// "If this field is not specified, it will default based on the
	// existence of ingress or egress rules; policies that contain an egress
	// section are assumed to affect egress, and all policies (whether or
	// not they contain an ingress section) are assumed to affect ingress."
	if len(np.Spec.PolicyTypes) == 0 {
		p.Ingress = true
		p.Egress = len(np.Spec.Egress) > 0
	}
	for i, t := range np.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			p.Ingress = true
		case networkingv1.PolicyTypeEgress:
			p.Egress = true
		default:
			// Which direction it meant is unknown: isolate both rather
			// than leave one open.
			p.Ingress, p.Egress = true, true
			if p.Broken == "" {
				p.Broken = fmt.Sprintf("spec.policyTypes[%d]: %q is neither Ingress nor Egress", i, t)
			}
		}
	}
	if p.Broken != "" {
		return p
	}
	for i, r := range np.Spec.Ingress {
		peers, ports, err := convertRule(fmt.Sprintf("spec.ingress[%d]", i), "from", np.Namespace, r.From, r.Ports)
		if err != nil {
			return p.broken(err)
		}
		// The peers are the source; the ports are the selected pod's.
		p.IngressRules = append(p.IngressRules, Rule{Action: Allow, Src: Match{Peers: peers}, Dst: Match{Ports: ports}})
	}
	for i, r := range np.Spec.Egress {
		peers, ports, err := convertRule(fmt.Sprintf("spec.egress[%d]", i), "to", np.Namespace, r.To, r.Ports)
		if err != nil {
			return p.broken(err)
		}
		p.EgressRules = append(p.EgressRules, Rule{Action: Allow, Dst: Match{Peers: peers, Ports: ports}})
	}
	return p
}

// broken marks a policy that cannot be translated: it keeps its selector
// and directions, and drops the rules already converted, so that nothing
// reading the model can allow through it.
func (p *Policy) broken(err error) *Policy {
	p.Broken = err.Error()
	p.IngressRules, p.EgressRules = nil, nil
	return p
}

// convertRule converts one rule's peers and ports; errors name the field
// from path, as in "spec.ingress[0].from[1].ipBlock.cidr: ...".
func convertRule(path, peersField, namespace string, peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort) (outPeers []Peer, outPorts []Port, err error) {
	for i, peer := range peers {
		p, matches, err := convertPeer(namespace, peer)
		if err != nil {
			return nil, nil, fmt.Errorf("%s.%s[%d]%w", path, peersField, i, err)
		}
		if matches {
			outPeers = append(outPeers, p)
		}
	}
	if len(peers) > 0 && outPeers == nil {
		// Every peer matches nothing, so the rule allows nothing; a nil
		// list would mean every peer.
		outPeers = []Peer{}
	}
	for i, port := range ports {
		pt, err := convertPort(port)
		if err != nil {
			return nil, nil, fmt.Errorf("%s.ports[%d]%w", path, i, err)
		}
		outPorts = append(outPorts, pt)
	}
	return outPeers, outPorts, nil
}

// convertPeer converts one peer. It reports matches=false for an ipBlock
// whose excepts cover its whole cidr: such a peer selects no address.
// Errors begin with the field inside the peer (".ipBlock.cidr: ..."), or
// ": " when the peer as a whole is wrong.
func convertPeer(namespace string, peer networkingv1.NetworkPolicyPeer) (p Peer, matches bool, err error) {
	if peer.IPBlock != nil {
		if peer.PodSelector != nil || peer.NamespaceSelector != nil {
			return Peer{}, false, fmt.Errorf(".ipBlock: cannot be combined with podSelector or namespaceSelector")
		}
		return convertIPBlock(peer.IPBlock)
	}
	pp := &PodPeer{Namespace: namespace, Pods: labels.Everything()}
	if peer.PodSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(peer.PodSelector)
		if err != nil {
			return Peer{}, false, fmt.Errorf(".podSelector: %w", err)
		}
		pp.Pods = s
	}
	if peer.NamespaceSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(peer.NamespaceSelector)
		if err != nil {
			return Peer{}, false, fmt.Errorf(".namespaceSelector: %w", err)
		}
		pp.Namespaces = s
	}
	if peer.PodSelector == nil && peer.NamespaceSelector == nil {
		return Peer{}, false, fmt.Errorf(": a peer needs podSelector, namespaceSelector or ipBlock")
	}
	return Peer{Pods: pp}, true, nil
}

// convertIPBlock converts an ipBlock into the normalised form of
// normaliseBlock: it reports matches=false for a block whose excepts
// leave no address.
func convertIPBlock(b *networkingv1.IPBlock) (p Peer, matches bool, err error) {
	cidr, err := parseBlockPrefix(b.CIDR)
	if err != nil {
		return Peer{}, false, fmt.Errorf(".ipBlock.cidr: %w", err)
	}
	var except []netip.Prefix
	for i, e := range b.Except {
		ex, err := parseBlockPrefix(e)
		if err != nil {
			return Peer{}, false, fmt.Errorf(".ipBlock.except[%d]: %w", i, err)
		}
		except = append(except, ex)
	}
	except, empty := normaliseBlock(cidr, except)
	if empty {
		return Peer{}, false, nil
	}
	return Peer{CIDR: cidr, Except: except}, true, nil
}

// parseBlockPrefix parses an ipBlock prefix, host bits and all (the API
// server accepts "10.0.0.1/8" and means 10.0.0.0/8).
func parseBlockPrefix(s string) (netip.Prefix, error) {
	pfx, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q is not a CIDR: %w", s, err)
	}
	if pfx.Addr().Is4In6() {
		// Package net, and so other implementations, read it as the IPv4
		// block; as IPv6 it would match no packet. Refuse to guess.
		return netip.Prefix{}, fmt.Errorf("%q is an IPv4-mapped IPv6 prefix; write the IPv4 block", s)
	}
	return pfx.Masked(), nil
}

// convertPort converts one port. Errors begin with the field inside the
// port (".endPort: ...").
func convertPort(port networkingv1.NetworkPolicyPort) (Port, error) {
	pt := Port{Protocol: TCP}
	if port.Protocol != nil {
		switch *port.Protocol {
		case corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
			pt.Protocol = Protocol(*port.Protocol)
		default:
			return pt, fmt.Errorf(".protocol: %q is not TCP, UDP or SCTP", *port.Protocol)
		}
	}
	if port.Port != nil {
		switch port.Port.Type {
		case intstr.Int:
			if port.Port.IntVal < 1 || port.Port.IntVal > 65535 {
				return pt, fmt.Errorf(".port: %d is out of range 1-65535", port.Port.IntVal)
			}
			pt.Number = port.Port.IntVal
		case intstr.String:
			// An empty name would leave the port unset, which means every
			// port.
			if port.Port.StrVal == "" {
				return pt, fmt.Errorf(".port: empty port name")
			}
			if port.EndPort != nil {
				return pt, fmt.Errorf(".endPort: cannot be used with the named port %q", port.Port.StrVal)
			}
			pt.Name = port.Port.StrVal
		default:
			// Not from JSON, but the type allows it; ignoring it would
			// allow every port.
			return pt, fmt.Errorf(".port: neither a number nor a name (type %d)", port.Port.Type)
		}
	}
	if port.EndPort != nil {
		if pt.Number == 0 {
			return pt, fmt.Errorf(".endPort: needs a numeric port")
		}
		if *port.EndPort < pt.Number || *port.EndPort > 65535 {
			return pt, fmt.Errorf(".endPort: %d must lie between port %d and 65535", *port.EndPort, pt.Number)
		}
		pt.EndPort = *port.EndPort
	}
	return pt, nil
}
