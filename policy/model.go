package policy

// This file is the normalised model every source of policy is converted
// into: one tiered model, the way Calico's Felix evaluates it, that
// Kubernetes NetworkPolicy lives in too (the default tier, order 1000).
// eval.go holds the reference semantics that the rendered rules must
// agree with. The model quotes the API reference where a branch
// implements it.

import (
	"cmp"
	"math"
	"net/netip"

	"k8s.io/apimachinery/pkg/labels"
)

// Protocol is an IP protocol: a name Calico and Kubernetes use (TCP, UDP,
// SCTP, ICMP, ICMPv6, UDPLite) or a decimal protocol number ("47").
type Protocol string

const (
	TCP     Protocol = "TCP"
	UDP     Protocol = "UDP"
	SCTP    Protocol = "SCTP"
	ICMP    Protocol = "ICMP"
	ICMPv6  Protocol = "ICMPv6"
	UDPLite Protocol = "UDPLite"
)

// Action is what a matching rule does.
type Action string

const (
	// Allow accepts the packet for this direction: evaluation ends.
	Allow Action = "Allow"
	// Deny drops the packet: evaluation ends.
	Deny Action = "Deny"
	// Pass skips the rest of the tier: evaluation goes on with the next
	// tier that selects the endpoint.
	Pass Action = "Pass"
	// Log logs the packet and goes on with the next rule.
	Log Action = "Log"
)

// Selector matches a set of labels. Both labels.Selector (Kubernetes
// label selectors) and the Calico selector language satisfy it. String
// is canonical: equal strings mean equal selections, so it names the
// ipsets a selector fills.
type Selector interface {
	Matches(labels.Labels) bool
	String() string
}

// Port matches ports. Exactly one of Number (with EndPort for a range) or
// Name is set; with neither, all ports of Protocol match.
type Port struct {
	Protocol Protocol
	Number   int32
	EndPort  int32
	// Name is resolved against the containerPorts of the pod on the
	// port's side of the flow.
	Name string
}

// PodPeer selects endpoints by label. "If namespaceSelector is also set,
// then the NetworkPolicyPeer as a whole selects the pods matching
// podSelector in the Namespaces selected by NamespaceSelector. Otherwise
// it selects the pods matching podSelector in the policy's own
// Namespace." Calico's selectors select network sets too (NetworkSets).
type PodPeer struct {
	// Namespaces selects namespaces by label; nil means only Namespace.
	Namespaces Selector
	// Namespace is the policy's own namespace, used when Namespaces is nil.
	Namespace string
	// Pods selects pods by label; labels.Everything() for all.
	Pods Selector
	// NetworkSets says the selector also selects network sets by their
	// labels: the NetworkSets of the namespaces in scope, and, with
	// Global, the GlobalNetworkSets.
	NetworkSets bool
	// Global means the GlobalNetworkSets are in scope; with OnlyGlobal,
	// only they are (Calico's namespaceSelector: global()).
	Global, OnlyGlobal bool
	// ServiceAccounts, when set, narrows the pods to those whose service
	// account it matches (Calico's serviceAccounts match).
	ServiceAccounts *ServiceAccountMatch
	// Nodes means Pods selects nodes by their labels, and the peer is
	// their addresses (the network sets that stand for nodes, cnp.go),
	// never a pod or another network set.
	Nodes bool
}

// ServiceAccountMatch matches a pod's service account by name (any of
// Names, when there are any) and by the account's labels (Selector, when
// set).
type ServiceAccountMatch struct {
	Names    []string
	Selector Selector
}

// Peer is one entry of a NetworkPolicy rule's from/to list: pods or an IP
// block.
type Peer struct {
	Pods   *PodPeer
	CIDR   netip.Prefix
	Except []netip.Prefix
}

// Match is what a rule asks of one end of a flow, its source or its
// destination. Every field that is set must hold.
type Match struct {
	// Peers is a NetworkPolicy from/to list: any of them; nil for every
	// endpoint.
	Peers []Peer
	// Nets: the address is in one of them (nil: any address); NotNets:
	// in none of them.
	Nets, NotNets []netip.Prefix
	// Selector: the endpoint (a pod, or an address of a network set) is
	// one it selects; NotSelector: one it does not.
	Selector, NotSelector *PodPeer
	// Ports: the port is one of them (nil: any port); NotPorts: none.
	Ports, NotPorts []Port
}

// ICMPMatch matches ICMP (or ICMPv6) messages by type and, optionally,
// code.
type ICMPMatch struct {
	Type int32
	// Code is -1 for any code.
	Code int32
}

// Rule is one rule: when a flow matches it, Action applies. "If this
// field is empty or missing, this rule matches all sources (traffic not
// restricted by source)"; likewise for every other field.
type Rule struct {
	// Action defaults to Allow (every NetworkPolicy rule allows).
	Action Action
	// Protocol matches the IP protocol ("" any); NotProtocol excludes one.
	Protocol, NotProtocol Protocol
	// ICMP and NotICMP match ICMP type and code.
	ICMP, NotICMP *ICMPMatch
	// IPVersion is 4 or 6 to match one family only, 0 for both.
	IPVersion int
	Src, Dst  Match
}

// action is the rule's action after defaulting.
func (r *Rule) action() Action {
	if r.Action == "" {
		return Allow
	}
	return r.Action
}

// Tier is an ordered group of policies. "Tiers are ordered by order,
// lower first; a tier without an order comes last; ties go by name."
type Tier struct {
	Name string
	// Order is +Inf when the tier has none.
	Order float64
	// DefaultAction is Deny (drop what the tier's policies did not
	// decide, for endpoints the tier selects) or Pass (go on to the next
	// tier).
	DefaultAction Action
	// Band orders tiers before Order does: ClusterNetworkPolicy's Admin
	// tier (-1) comes before every Calico tier and the default tier (0),
	// its Baseline tier (1) after them, whatever their order (cnp.go).
	Band int
}

// Well-known tiers. The default tier holds Kubernetes NetworkPolicy
// (at order 1000) and Calico policies without a tier.
const (
	DefaultTierName       = "default"
	DefaultTierOrder      = 1e6
	KubernetesPolicyOrder = 1000
	NoOrder               = math.MaxFloat64 // "none = last"; +Inf is not JSON
)

// DefaultTier is the tier Kubernetes NetworkPolicy sits in, as Calico
// installs it.
func DefaultTier() *Tier {
	return &Tier{Name: DefaultTierName, Order: DefaultTierOrder, DefaultAction: Deny}
}

// Policy is one network policy, normalised.
type Policy struct {
	// Key is unique across sources: "namespace/name" for networking/v1,
	// qualified by the API for the others (see calico.go).
	Key string
	// Name breaks ties of order inside a tier.
	Name string
	// Tier is the policy's tier; nil means the default tier.
	Tier *Tier
	// Order places the policy in its tier, lower first (NoOrder: last).
	Order float64
	// Namespace is the policy's own namespace; "" for a cluster-wide
	// policy, which selects pods of every namespace NamespaceSelector
	// matches (nil: all).
	Namespace         string
	NamespaceSelector Selector
	// PodSelector selects the policy's pods.
	PodSelector Selector
	// ServiceAccounts, when set, narrows the pods selected to those of
	// matching service accounts.
	ServiceAccounts *ServiceAccountMatch
	// Ingress and Egress say which directions the policy isolates
	// (policyTypes or types after defaulting).
	Ingress, Egress bool
	IngressRules    []Rule
	EgressRules     []Rule
	// Staged policies are never enforced and never end a tier; they are
	// kept for what they would decide.
	Staged bool
	// Broken is set when the source could not be translated; the policy
	// then fails closed: its rules are what the converter left for that
	// (none for NetworkPolicy, which can only allow, and a Deny of all
	// for the kinds that can deny), never what it could not read.
	Broken string
}

// tier returns the policy's tier, the default tier when unset.
func (p *Policy) tier() *Tier {
	if p.Tier == nil {
		return defaultTier
	}
	return p.Tier
}

var defaultTier = DefaultTier()

// comparePolicies orders policies as Felix applies them: by tier (order,
// then name), then by order in the tier, then by name, then by key.
func comparePolicies(a, b *Policy) int {
	ta, tb := a.tier(), b.tier()
	if c := cmp.Compare(ta.Band, tb.Band); c != 0 {
		return c
	}
	if c := cmp.Compare(ta.Order, tb.Order); c != 0 {
		return c
	}
	if c := cmp.Compare(ta.Name, tb.Name); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Order, b.Order); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Name, b.Name); c != 0 {
		return c
	}
	return cmp.Compare(a.Key, b.Key)
}

// Pod is what the policy loop knows of a pod.
type Pod struct {
	Namespace string
	Name      string
	Labels    labels.Set
	IPs       []netip.Addr
	// NamedPorts maps containerPort names to protocol and number.
	NamedPorts map[string]NamedPort
	// ServiceAccount is the pod's service account, and
	// ServiceAccountLabels that account's labels.
	ServiceAccount       string
	ServiceAccountLabels labels.Set
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

// NetworkSet is a labelled list of addresses outside the pods (Calico's
// NetworkSet, or a GlobalNetworkSet when Namespace is "").
type NetworkSet struct {
	Key       string
	Namespace string
	Labels    labels.Set
	Nets      []netip.Prefix
	// Node says the set stands for a node (its addresses), which only a
	// nodes peer selects.
	Node bool
}

// Selects reports whether the policy applies to the pod; ns is the pod's
// namespace (cluster-wide policies select by its labels).
func (p *Policy) Selects(pod *Pod, ns *Namespace) bool {
	if pod == nil {
		return false
	}
	if p.Namespace != "" {
		if pod.Namespace != p.Namespace {
			return false
		}
	} else if p.NamespaceSelector != nil && (ns == nil || !matchNamespace(p.NamespaceSelector, ns)) {
		return false
	}
	if p.ServiceAccounts != nil && !p.ServiceAccounts.matches(pod) {
		return false
	}
	return matchPod(p.PodSelector, pod)
}

func (sa *ServiceAccountMatch) matches(pod *Pod) bool {
	if len(sa.Names) > 0 {
		found := false
		for _, n := range sa.Names {
			found = found || n == pod.ServiceAccount
		}
		if !found {
			return false
		}
	}
	return sa.Selector == nil || sa.Selector.Matches(pod.ServiceAccountLabels)
}

// Matches reports whether a pod peer selects a pod in a namespace.
func (pp *PodPeer) Matches(pod *Pod, ns *Namespace) bool {
	if pp.OnlyGlobal || pp.Nodes {
		return false // selects global network sets only
	}
	if pp.Namespaces == nil {
		if pod.Namespace != pp.Namespace {
			return false
		}
	} else if ns == nil || !matchNamespace(pp.Namespaces, ns) {
		return false
	}
	if pp.ServiceAccounts != nil && !pp.ServiceAccounts.matches(pod) {
		return false
	}
	return matchPod(pp.Pods, pod)
}

// MatchesSet reports whether a pod peer selects a network set; ns is the
// set's namespace (nil for a global set).
func (pp *PodPeer) MatchesSet(s *NetworkSet, ns *Namespace) bool {
	if pp.Nodes || s.Node {
		return pp.Nodes && s.Node && pp.Pods.Matches(s.Labels)
	}
	if !pp.NetworkSets || pp.ServiceAccounts != nil {
		return false // a service account match selects pods only
	}
	if s.Namespace == "" {
		if !pp.Global {
			return false
		}
	} else {
		switch {
		case pp.OnlyGlobal:
			return false
		case pp.Namespaces == nil:
			if s.Namespace != pp.Namespace {
				return false
			}
		case ns == nil || !matchNamespace(pp.Namespaces, ns):
			return false
		}
	}
	return matchLabels(pp.Pods, s.Labels, labels.Set{calicoNamespaceLabel: s.Namespace})
}

// namespaceScoped returns the one namespace whose pods and network sets
// the peer can select, or "" when it can select in several.
func (pp *PodPeer) namespaceScoped() string {
	if pp.Namespaces == nil && !pp.OnlyGlobal && !pp.Global {
		return pp.Namespace
	}
	return ""
}

// The labels Calico gives every workload endpoint, namespace and
// namespaced network set, which its selectors may use
// ("projectcalico.org/namespace == 'shop'"). Kubernetes label selectors do
// not see them: NetworkPolicy's semantics stay the API's.
const (
	calicoNamespaceLabel      = "projectcalico.org/namespace"
	calicoOrchestratorLabel   = "projectcalico.org/orchestrator"
	calicoServiceAccountLabel = "projectcalico.org/serviceaccount"
	calicoNameLabel           = "projectcalico.org/name"
)

func matchPod(sel Selector, pod *Pod) bool {
	c, ok := sel.(calicoSelector)
	if !ok {
		return sel.Matches(pod.Labels)
	}
	return c.sel.EvaluateLabels(podCalicoLabels{pod})
}

func matchNamespace(sel Selector, ns *Namespace) bool {
	c, ok := sel.(calicoSelector)
	if !ok {
		return sel.Matches(ns.Labels)
	}
	return c.sel.EvaluateLabels(calicoLabels{ns.Labels, labels.Set{calicoNameLabel: ns.Name}})
}

// matchLabels matches a selector over labels, a Calico selector over the
// labels Calico adds as well.
func matchLabels(sel Selector, own labels.Set, calico labels.Set) bool {
	if c, ok := sel.(calicoSelector); ok {
		return c.sel.EvaluateLabels(calicoLabels{own, calico})
	}
	return sel.Matches(own)
}

// podCalicoLabels is a pod's labels as Calico's selectors see them,
// without building a map per match.
type podCalicoLabels struct{ pod *Pod }

func (p podCalicoLabels) Get(name string) (string, bool) {
	switch name {
	case calicoNamespaceLabel:
		return p.pod.Namespace, true
	case calicoOrchestratorLabel:
		return "k8s", true
	case calicoServiceAccountLabel:
		return p.pod.ServiceAccount, true
	}
	v, ok := p.pod.Labels[name]
	return v, ok
}
