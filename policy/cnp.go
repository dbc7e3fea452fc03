package policy

// This file converts ClusterNetworkPolicy (policy.networking.k8s.io
// v1beta1, sigs.k8s.io/network-policy-api v0.3.0) into the tiered model.
// It is one more converter, never a second dataplane: "Policy tiers are
// evaluated in the following order: Admin tier, NetworkPolicy tier,
// Baseline tier", so the Admin tier is a tier banded before every Calico
// tier and the default tier (where Kubernetes NetworkPolicy lives), and
// the Baseline tier one banded after them all. Calico maps its
// (Baseline)AdminNetworkPolicy the same way, onto tiers of its own.
//
// Both tiers pass on what their rules did not decide: "a
// ClusterNetworkPolicy never isolates a pod by itself". The rest follows
// from the model's semantics: Accept and Deny end the direction, Pass
// skips the rest of the tier; the default tier is skipped for a pod no
// NetworkPolicy selects (so Baseline decides only there) and drops at its
// end for one that it selects (so "v1.NetworkPolicy always makes a final
// decision for selected pods").

import (
	"errors"
	"fmt"
	"math"
	"net/netip"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	cnpv1beta1 "sigs.k8s.io/network-policy-api/apis/v1beta1"
)

// ClusterNetworkPolicyKey prefixes the model keys of ClusterNetworkPolicies
// ("ClusterNetworkPolicy.policy.networking.k8s.io/<name>").
const ClusterNetworkPolicyKey = "ClusterNetworkPolicy.policy.networking.k8s.io/"

// The names of the two tiers. A Calico Tier is a Kubernetes object, whose
// name is lower case: these can never collide with one.
const (
	AdminTierName    = "ClusterNetworkPolicy:Admin"
	BaselineTierName = "ClusterNetworkPolicy:Baseline"
)

var (
	adminTier    = &Tier{Name: AdminTierName, Order: -math.MaxFloat64, DefaultAction: Pass, Band: -1}
	baselineTier = &Tier{Name: BaselineTierName, Order: -math.MaxFloat64, DefaultAction: Pass, Band: 1}
)

// AdminTier and BaselineTier return ClusterNetworkPolicy's tiers.
func AdminTier() *Tier    { return adminTier }
func BaselineTier() *Tier { return baselineTier }

// NodeNetworkSetKey is the key of the network set that stands for a node
// (its addresses and labels), which a nodes peer selects.
const NodeNetworkSetKey = "Node/"

// FromNode converts a node into the network set a nodes peer selects: the
// addresses of node.Status.Addresses that are IPs ("It selects the nodeIPs
// as the peer type by matching on the IPs present in the
// node.Status.Addresses field of the node").
func FromNode(name string, lbls map[string]string, addresses []string) *NetworkSet {
	s := &NetworkSet{Key: NodeNetworkSetKey + name, Labels: labels.Set(lbls), Node: true}
	for _, a := range addresses {
		if ip, err := netip.ParseAddr(a); err == nil {
			s.Nets = append(s.Nets, netip.PrefixFrom(ip, ip.BitLen()))
		}
	}
	return s
}

// FromClusterNetworkPolicy converts a ClusterNetworkPolicy. What it
// cannot read fails closed as the API says: an unknown peer or protocol
// makes an Accept rule match nothing and a Deny or Pass rule match
// everything; Broken then says why, for the status and events.
func FromClusterNetworkPolicy(cnp *cnpv1beta1.ClusterNetworkPolicy) *Policy {
	s := &cnp.Spec
	p := &Policy{Key: ClusterNetworkPolicyKey + cnp.Name, Name: cnp.Name, Order: float64(s.Priority),
		Ingress: len(s.Ingress) > 0, Egress: len(s.Egress) > 0}
	var problems []error
	switch s.Tier {
	case cnpv1beta1.AdminTier:
		p.Tier = adminTier
	case cnpv1beta1.BaselineTier:
		p.Tier = baselineTier
	default:
		// Which tier it meant is unknown: the Admin tier, with its rules
		// read as they are, is where a Deny cannot be overridden.
		p.Tier = adminTier
		problems = append(problems, fmt.Errorf("spec.tier: %q is neither Admin nor Baseline", s.Tier))
	}
	if err := p.convertCNPSubject(&s.Subject); err != nil {
		problems = append(problems, err)
	}
	for i := range s.Ingress {
		r := &s.Ingress[i]
		peers := make([]cnpPeer, len(r.From))
		for j, f := range r.From {
			peers[j] = cnpPeer{namespaces: f.Namespaces, pods: f.Pods}
		}
		rules, err := cnpRules(r.Action, peers, r.Protocols, false)
		if err != nil {
			problems = append(problems, fmt.Errorf("spec.ingress[%d]: %w", i, err))
		}
		p.IngressRules = append(p.IngressRules, rules...)
	}
	for i := range s.Egress {
		r := &s.Egress[i]
		peers := make([]cnpPeer, len(r.To))
		for j, t := range r.To {
			peers[j] = cnpPeer{namespaces: t.Namespaces, pods: t.Pods, nodes: t.Nodes, networks: t.Networks, domainNames: len(t.DomainNames) > 0}
		}
		rules, err := cnpRules(r.Action, peers, r.Protocols, true)
		if err != nil {
			problems = append(problems, fmt.Errorf("spec.egress[%d]: %w", i, err))
		}
		p.EgressRules = append(p.EgressRules, rules...)
	}
	if err := errors.Join(problems...); err != nil {
		p.Broken = err.Error()
	}
	return p
}

// convertCNPSubject sets the pods the policy applies to. "Exactly one field
// must be set"; with neither (a field this version does not know), the
// policy selects no pod: which pods it meant is unknown.
func (p *Policy) convertCNPSubject(s *cnpv1beta1.ClusterNetworkPolicySubject) error {
	switch {
	case s.Namespaces != nil:
		sel, err := cnpSelector(s.Namespaces)
		if err != nil {
			p.PodSelector = labels.Nothing()
			return fmt.Errorf("spec.subject.namespaces: %w", err)
		}
		p.NamespaceSelector, p.PodSelector = sel, labels.Everything()
	case s.Pods != nil:
		nsSel, err1 := cnpSelector(&s.Pods.NamespaceSelector)
		podSel, err2 := cnpSelector(&s.Pods.PodSelector)
		if err := errors.Join(err1, err2); err != nil {
			p.PodSelector = labels.Nothing()
			return fmt.Errorf("spec.subject.pods: %w", err)
		}
		p.NamespaceSelector, p.PodSelector = nsSel, podSel
	default:
		p.PodSelector = labels.Nothing()
		return errors.New("spec.subject: neither namespaces nor pods is set; the policy selects no pod")
	}
	return nil
}

// cnpPeer is what the ingress and egress peers share.
type cnpPeer struct {
	namespaces  *metav1.LabelSelector
	pods        *cnpv1beta1.NamespacedPod
	nodes       *metav1.LabelSelector
	networks    []cnpv1beta1.CIDR
	domainNames bool
}

// cnpRules converts one rule. A rule's peers are "any of", and so are the
// model's Peers; a nodes peer is a selector over the node network sets,
// which Peers cannot say, so it becomes a rule of its own right after,
// with the same action: in order, the first match decides, and every one
// of them decides the same.
func cnpRules(action cnpv1beta1.ClusterNetworkPolicyRuleAction, peers []cnpPeer, protocols []cnpv1beta1.ClusterNetworkPolicyProtocol, egress bool) ([]Rule, error) {
	var act Action
	var problems []error
	switch action {
	case cnpv1beta1.ClusterNetworkPolicyRuleActionAccept:
		act = Allow
	case cnpv1beta1.ClusterNetworkPolicyRuleActionDeny:
		act = Deny
	case cnpv1beta1.ClusterNetworkPolicyRuleActionPass:
		act = Pass
	default:
		// An action this version does not know: Deny is the closed side.
		act = Deny
		problems = append(problems, fmt.Errorf("action: %q is not Accept, Deny or Pass; read as Deny", action))
	}
	ports, all, err := cnpPorts(protocols, act)
	if err != nil {
		problems = append(problems, err)
	}
	if ports != nil && len(ports) == 0 && !all {
		return nil, errors.Join(problems...) // an Accept whose every protocol is unknown matches nothing
	}
	var list []Peer
	var nodeRules []Rule
	unknown := false
	for i, pe := range peers {
		field := "from"
		if egress {
			field = "to"
		}
		field = fmt.Sprintf("%s[%d]", field, i)
		switch {
		case pe.namespaces != nil:
			sel, err := cnpSelector(pe.namespaces)
			if err != nil {
				problems = append(problems, fmt.Errorf("%s.namespaces: %w", field, err))
				unknown = true
				continue
			}
			list = append(list, Peer{Pods: &PodPeer{Namespaces: sel, Pods: labels.Everything()}})
		case pe.pods != nil:
			nsSel, err1 := cnpSelector(&pe.pods.NamespaceSelector)
			podSel, err2 := cnpSelector(&pe.pods.PodSelector)
			if err := errors.Join(err1, err2); err != nil {
				problems = append(problems, fmt.Errorf("%s.pods: %w", field, err))
				unknown = true
				continue
			}
			list = append(list, Peer{Pods: &PodPeer{Namespaces: nsSel, Pods: podSel}})
		case len(pe.networks) > 0:
			for j, n := range pe.networks {
				pfx, err := netip.ParsePrefix(string(n))
				if err != nil {
					problems = append(problems, fmt.Errorf("%s.networks[%d]: %w", field, j, err))
					unknown = true
					continue
				}
				list = append(list, Peer{CIDR: pfx.Masked()})
			}
		case pe.nodes != nil:
			sel, err := cnpSelector(pe.nodes)
			if err != nil {
				problems = append(problems, fmt.Errorf("%s.nodes: %w", field, err))
				unknown = true
				continue
			}
			nodeRules = append(nodeRules, Rule{Action: act, Dst: Match{Selector: &PodPeer{Nodes: true, NetworkSets: true, Pods: sel}, Ports: ports}})
		default:
			what := "no peer kind Sluice knows is set"
			if pe.domainNames {
				what = "domainNames peers are not supported"
			}
			problems = append(problems, fmt.Errorf("%s: %s", field, what))
			unknown = true
		}
	}
	if unknown && act != Allow {
		// "For Deny and Pass rules, fail closed means: treat the rule as
		// a Deny all rule": one that matches every peer (and, for Pass,
		// passes every peer on, the closest Pass comes to it).
		return []Rule{cnpRule(act, nil, ports, egress)}, errors.Join(problems...)
	}
	var out []Rule
	if len(list) > 0 {
		out = append(out, cnpRule(act, list, ports, egress))
	}
	return append(out, nodeRules...), errors.Join(problems...)
}

// cnpRule is a rule over peers (nil: every peer) and destination ports.
func cnpRule(act Action, peers []Peer, ports []Port, egress bool) Rule {
	r := Rule{Action: act, Dst: Match{Ports: ports}}
	if egress {
		r.Dst.Peers = peers
	} else {
		r.Src.Peers = peers
	}
	return r
}

// cnpPorts converts protocols into destination ports: nil for no
// protocols (every port of every protocol). all says an unknown entry made
// a Deny or Pass match every port.
func cnpPorts(protocols []cnpv1beta1.ClusterNetworkPolicyProtocol, act Action) (ports []Port, all bool, err error) {
	if len(protocols) == 0 {
		return nil, false, nil
	}
	var problems []error
	ports = []Port{}
	for i, pr := range protocols {
		switch {
		case pr.TCP != nil:
			ports = append(ports, cnpPort(TCP, pr.TCP.DestinationPort))
		case pr.UDP != nil:
			ports = append(ports, cnpPort(UDP, pr.UDP.DestinationPort))
		case pr.SCTP != nil:
			ports = append(ports, cnpPort(SCTP, pr.SCTP.DestinationPort))
		case pr.DestinationNamedPort != "":
			// A named port carries its protocol in the containerPort:
			// one port per protocol, each matching only a containerPort
			// of that protocol.
			for _, proto := range []Protocol{TCP, UDP, SCTP} {
				ports = append(ports, Port{Protocol: proto, Name: pr.DestinationNamedPort})
			}
		default:
			problems = append(problems, fmt.Errorf("protocols[%d]: no protocol Sluice knows is set", i))
			if act != Allow {
				all = true
			}
		}
	}
	if all {
		return nil, true, errors.Join(problems...)
	}
	return ports, false, errors.Join(problems...)
}

func cnpPort(proto Protocol, p *cnpv1beta1.Port) Port {
	out := Port{Protocol: proto}
	switch {
	case p == nil:
	case p.Range != nil:
		out.Number, out.EndPort = p.Range.Start, p.Range.End
	default:
		out.Number = p.Number
	}
	return out
}

// cnpSelector is a label selector; "if empty, it selects all".
func cnpSelector(ls *metav1.LabelSelector) (labels.Selector, error) {
	return metav1.LabelSelectorAsSelector(ls)
}
