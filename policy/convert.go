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
	p := &Policy{Key: np.Namespace + "/" + np.Name, Namespace: np.Namespace}
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
	for _, t := range np.Spec.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress:
			p.Ingress = true
		case networkingv1.PolicyTypeEgress:
			p.Egress = true
		}
	}
	if p.Broken != "" {
		return p
	}
	for i, r := range np.Spec.Ingress {
		rule, err := convertRule(np.Namespace, r.From, r.Ports)
		if err != nil {
			p.Broken = fmt.Sprintf("spec.ingress[%d]: %v", i, err)
			return p
		}
		p.IngressRules = append(p.IngressRules, rule)
	}
	for i, r := range np.Spec.Egress {
		rule, err := convertRule(np.Namespace, r.To, r.Ports)
		if err != nil {
			p.Broken = fmt.Sprintf("spec.egress[%d]: %v", i, err)
			return p
		}
		p.EgressRules = append(p.EgressRules, rule)
	}
	return p
}

func convertRule(namespace string, peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort) (Rule, error) {
	var r Rule
	for i, peer := range peers {
		p, err := convertPeer(namespace, peer)
		if err != nil {
			return r, fmt.Errorf("peer %d: %w", i, err)
		}
		r.Peers = append(r.Peers, p)
	}
	for i, port := range ports {
		pt, err := convertPort(port)
		if err != nil {
			return r, fmt.Errorf("ports[%d]: %w", i, err)
		}
		r.Ports = append(r.Ports, pt)
	}
	return r, nil
}

func convertPeer(namespace string, peer networkingv1.NetworkPolicyPeer) (Peer, error) {
	if peer.IPBlock != nil {
		if peer.PodSelector != nil || peer.NamespaceSelector != nil {
			return Peer{}, fmt.Errorf("ipBlock cannot be combined with a selector")
		}
		cidr, err := netip.ParsePrefix(peer.IPBlock.CIDR)
		if err != nil {
			return Peer{}, fmt.Errorf("ipBlock.cidr %q: %w", peer.IPBlock.CIDR, err)
		}
		p := Peer{CIDR: cidr.Masked()}
		for _, e := range peer.IPBlock.Except {
			ex, err := netip.ParsePrefix(e)
			if err != nil {
				return Peer{}, fmt.Errorf("ipBlock.except %q: %w", e, err)
			}
			p.Except = append(p.Except, ex.Masked())
		}
		return p, nil
	}
	pp := &PodPeer{Namespace: namespace, Pods: labels.Everything()}
	if peer.PodSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(peer.PodSelector)
		if err != nil {
			return Peer{}, fmt.Errorf("podSelector: %w", err)
		}
		pp.Pods = s
	}
	if peer.NamespaceSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(peer.NamespaceSelector)
		if err != nil {
			return Peer{}, fmt.Errorf("namespaceSelector: %w", err)
		}
		pp.Namespaces = s
	}
	if peer.PodSelector == nil && peer.NamespaceSelector == nil {
		return Peer{}, fmt.Errorf("a peer needs podSelector, namespaceSelector or ipBlock")
	}
	return Peer{Pods: pp}, nil
}

func convertPort(port networkingv1.NetworkPolicyPort) (Port, error) {
	pt := Port{Protocol: TCP}
	if port.Protocol != nil {
		switch *port.Protocol {
		case corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
			pt.Protocol = Protocol(*port.Protocol)
		default:
			return pt, fmt.Errorf("protocol %q is not TCP, UDP or SCTP", *port.Protocol)
		}
	}
	if port.Port != nil {
		switch port.Port.Type {
		case intstr.Int:
			if port.Port.IntVal < 1 || port.Port.IntVal > 65535 {
				return pt, fmt.Errorf("port %d is out of range", port.Port.IntVal)
			}
			pt.Number = port.Port.IntVal
		case intstr.String:
			if port.EndPort != nil {
				return pt, fmt.Errorf("endPort cannot be used with the named port %q", port.Port.StrVal)
			}
			pt.Name = port.Port.StrVal
		}
	}
	if port.EndPort != nil {
		if pt.Number == 0 {
			return pt, fmt.Errorf("endPort needs a numeric port")
		}
		if *port.EndPort < pt.Number || *port.EndPort > 65535 {
			return pt, fmt.Errorf("endPort %d must lie between port %d and 65535", *port.EndPort, pt.Number)
		}
		pt.EndPort = *port.EndPort
	}
	return pt, nil
}
