// Package calicotest holds what the Calico tests of several packages
// share: the hand translation of a Kubernetes NetworkPolicy into the
// Calico NetworkPolicy a user would write for it, for the parity tests.
package calicotest

import (
	"fmt"
	"sort"
	"strings"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	"github.com/projectcalico/api/pkg/lib/numorstring"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// FromKubernetes hand-translates a NetworkPolicy into the Calico
// NetworkPolicy a user would write for it: the default tier at order
// 1000, one Allow rule per peer and port (peers and ports are unions),
// ipBlock as nets and notNets, label selectors in Calico's language.
func FromKubernetes(np *networkingv1.NetworkPolicy) *v3.NetworkPolicy {
	order := float64(1000)
	out := &v3.NetworkPolicy{ObjectMeta: np.ObjectMeta, Spec: v3.NetworkPolicySpec{Order: &order, Selector: calicoSelectorOf(&np.Spec.PodSelector)}}
	for _, t := range np.Spec.PolicyTypes {
		out.Spec.Types = append(out.Spec.Types, v3.PolicyType(t))
	}
	if len(np.Spec.PolicyTypes) == 0 {
		// Kubernetes' defaulting, written out (Calico's differs).
		out.Spec.Types = []v3.PolicyType{v3.PolicyTypeIngress}
		if len(np.Spec.Egress) > 0 {
			out.Spec.Types = append(out.Spec.Types, v3.PolicyTypeEgress)
		}
	}
	for _, r := range np.Spec.Ingress {
		out.Spec.Ingress = append(out.Spec.Ingress, calicoRules(r.From, r.Ports, false)...)
	}
	for _, r := range np.Spec.Egress {
		out.Spec.Egress = append(out.Spec.Egress, calicoRules(r.To, r.Ports, true)...)
	}
	return out
}

func calicoRules(peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort, egress bool) []v3.Rule {
	ents := []v3.EntityRule{{}}
	if len(peers) > 0 {
		ents = nil
	}
	for _, p := range peers {
		var e v3.EntityRule
		if p.IPBlock != nil {
			e.Nets, e.NotNets = []string{p.IPBlock.CIDR}, p.IPBlock.Except
		} else {
			e.Selector = "all()"
			if p.PodSelector != nil {
				e.Selector = calicoSelectorOf(p.PodSelector)
			}
			if p.NamespaceSelector != nil {
				e.NamespaceSelector = calicoSelectorOf(p.NamespaceSelector)
			}
		}
		ents = append(ents, e)
	}
	var out []v3.Rule
	for _, e := range ents {
		if len(ports) == 0 {
			out = append(out, calicoRule(e, v3.EntityRule{}, nil, egress))
			continue
		}
		for _, pt := range ports {
			proto := numorstring.ProtocolFromString("TCP")
			if pt.Protocol != nil {
				proto = numorstring.ProtocolFromString(string(*pt.Protocol))
			}
			var dst v3.EntityRule
			switch {
			case pt.Port == nil:
			case pt.Port.Type == intstr.String:
				dst.Ports = []numorstring.Port{numorstring.NamedPort(pt.Port.StrVal)}
			case pt.EndPort != nil:
				dst.Ports = []numorstring.Port{{MinPort: uint16(pt.Port.IntVal), MaxPort: uint16(*pt.EndPort)}}
			default:
				dst.Ports = []numorstring.Port{numorstring.SinglePort(uint16(pt.Port.IntVal))}
			}
			out = append(out, calicoRule(e, dst, &proto, egress))
		}
	}
	return out
}

// calicoRule puts the peer on its side: the source of an ingress rule,
// the destination of an egress rule (with the ports).
func calicoRule(peer, ports v3.EntityRule, proto *numorstring.Protocol, egress bool) v3.Rule {
	r := v3.Rule{Action: v3.Allow, Protocol: proto, Source: peer, Destination: ports}
	if egress {
		peer.Ports = ports.Ports
		r.Source, r.Destination = v3.EntityRule{}, peer
	}
	return r
}

func calicoSelectorOf(ls *metav1.LabelSelector) string {
	var terms []string
	keys := make([]string, 0, len(ls.MatchLabels))
	for k := range ls.MatchLabels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		terms = append(terms, fmt.Sprintf("%s == '%s'", k, ls.MatchLabels[k]))
	}
	quote := func(vs []string) string {
		var q []string
		for _, v := range vs {
			q = append(q, "'"+v+"'")
		}
		return "{" + strings.Join(q, ", ") + "}"
	}
	for _, e := range ls.MatchExpressions {
		switch e.Operator {
		case metav1.LabelSelectorOpIn:
			terms = append(terms, fmt.Sprintf("%s in %s", e.Key, quote(e.Values)))
		case metav1.LabelSelectorOpNotIn:
			terms = append(terms, fmt.Sprintf("%s not in %s", e.Key, quote(e.Values)))
		case metav1.LabelSelectorOpExists:
			terms = append(terms, fmt.Sprintf("has(%s)", e.Key))
		case metav1.LabelSelectorOpDoesNotExist:
			terms = append(terms, fmt.Sprintf("!has(%s)", e.Key))
		}
	}
	if len(terms) == 0 {
		return "all()"
	}
	return strings.Join(terms, " && ")
}
