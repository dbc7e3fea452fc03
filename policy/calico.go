package policy

// This file converts projectcalico.org/v3 objects into the model, with
// the defaulting and validation the calico-apiserver would do: with only
// Sluice installed, the CRDs store what kubectl sent, and the agent is the
// first to read it. An object that cannot be converted fails closed for
// the endpoints it selects (a Deny of all in its directions), never open.

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	"github.com/projectcalico/api/pkg/lib/numorstring"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// Policy keys of the Calico kinds: the kind and group, then
// "namespace/name" or the name. Kubernetes NetworkPolicy keys stay
// "namespace/name".
const (
	CalicoNetworkPolicyKey        = "NetworkPolicy.projectcalico.org/"
	CalicoGlobalNetworkPolicyKey  = "GlobalNetworkPolicy.projectcalico.org/"
	StagedNetworkPolicyKey        = "StagedNetworkPolicy.projectcalico.org/"
	StagedGlobalNetworkPolicyKey  = "StagedGlobalNetworkPolicy.projectcalico.org/"
	StagedKubernetesNetworkPolicy = "StagedKubernetesNetworkPolicy.projectcalico.org/"
)

// TierLookup returns a tier by name, nil when it does not exist.
type TierLookup func(name string) *Tier

// calicoPolicy is what the policy kinds share.
type calicoPolicy struct {
	key, namespace, name string
	global, staged       bool
	tier                 string
	order                *float64
	ingress, egress      []v3.Rule
	selector, nsSelector string
	saSelector           string
	types                []v3.PolicyType
	// hostOnly names a set field that applies to host endpoints only.
	hostOnly string
}

// FromCalicoNetworkPolicy converts a namespaced Calico NetworkPolicy.
func FromCalicoNetworkPolicy(np *v3.NetworkPolicy, tiers TierLookup) *Policy {
	s := &np.Spec
	return convertCalico(&calicoPolicy{key: CalicoNetworkPolicyKey + np.Namespace + "/" + np.Name, namespace: np.Namespace, name: np.Name,
		tier: s.Tier, order: s.Order, ingress: s.Ingress, egress: s.Egress, selector: s.Selector, saSelector: s.ServiceAccountSelector, types: s.Types}, tiers)
}

// FromCalicoGlobalNetworkPolicy converts a GlobalNetworkPolicy.
func FromCalicoGlobalNetworkPolicy(gnp *v3.GlobalNetworkPolicy, tiers TierLookup) *Policy {
	s := &gnp.Spec
	c := &calicoPolicy{key: CalicoGlobalNetworkPolicyKey + gnp.Name, name: gnp.Name, global: true,
		tier: s.Tier, order: s.Order, ingress: s.Ingress, egress: s.Egress, selector: s.Selector, nsSelector: s.NamespaceSelector,
		saSelector: s.ServiceAccountSelector, types: s.Types}
	switch {
	case s.DoNotTrack:
		c.hostOnly = "spec.doNotTrack"
	case s.PreDNAT:
		c.hostOnly = "spec.preDNAT"
	case s.ApplyOnForward:
		c.hostOnly = "spec.applyOnForward"
	}
	return convertCalico(c, tiers)
}

// FromStagedNetworkPolicy converts a StagedNetworkPolicy: never enforced,
// kept for what it would decide.
func FromStagedNetworkPolicy(np *v3.StagedNetworkPolicy, tiers TierLookup) *Policy {
	s := &np.Spec
	return convertCalico(&calicoPolicy{key: StagedNetworkPolicyKey + np.Namespace + "/" + np.Name, namespace: np.Namespace, name: np.Name, staged: true,
		tier: s.Tier, order: s.Order, ingress: s.Ingress, egress: s.Egress, selector: s.Selector, saSelector: s.ServiceAccountSelector, types: s.Types}, tiers)
}

// FromStagedGlobalNetworkPolicy converts a StagedGlobalNetworkPolicy.
func FromStagedGlobalNetworkPolicy(gnp *v3.StagedGlobalNetworkPolicy, tiers TierLookup) *Policy {
	s := &gnp.Spec
	return convertCalico(&calicoPolicy{key: StagedGlobalNetworkPolicyKey + gnp.Name, name: gnp.Name, global: true, staged: true,
		tier: s.Tier, order: s.Order, ingress: s.Ingress, egress: s.Egress, selector: s.Selector, nsSelector: s.NamespaceSelector,
		saSelector: s.ServiceAccountSelector, types: s.Types}, tiers)
}

// FromStagedKubernetesNetworkPolicy converts a staged Kubernetes policy
// through FromNetworkPolicy.
func FromStagedKubernetesNetworkPolicy(sk *v3.StagedKubernetesNetworkPolicy) *Policy {
	np := stagedAsNetworkPolicy(sk)
	p := FromNetworkPolicy(np)
	p.Key, p.Staged = StagedKubernetesNetworkPolicy+sk.Namespace+"/"+sk.Name, true
	return p
}

// FromTier converts a Tier, with Calico's defaults: no order means last,
// no defaultAction means Deny.
func FromTier(t *v3.Tier) (*Tier, error) {
	out := &Tier{Name: t.Name, Order: NoOrder, DefaultAction: Deny}
	if t.Spec.Order != nil {
		out.Order = *t.Spec.Order
	}
	if t.Name == DefaultTierName && t.Spec.Order == nil {
		out.Order = DefaultTierOrder
	}
	if a := t.Spec.DefaultAction; a != nil {
		switch Action(*a) {
		case Deny, Pass:
			out.DefaultAction = Action(*a)
		default:
			// Which way it meant is unknown: Deny is the closed side.
			return out, fmt.Errorf("spec.defaultAction: %q is neither Deny nor Pass", *a)
		}
	}
	if t.Name == DefaultTierName && out.DefaultAction != Deny {
		// "The 'default' tier must have default action 'Deny'": the
		// Kubernetes policies in it rely on the drop at its end.
		out.DefaultAction = Deny
		return out, fmt.Errorf("spec.defaultAction: the default tier's default action must be Deny, not %q", *t.Spec.DefaultAction)
	}
	return out, nil
}

// FromNetworkSet converts a NetworkSet, or a GlobalNetworkSet when
// namespace is "". Nets that do not parse are left out and reported: the
// rest of the set still works.
func FromNetworkSet(namespace, name string, lbls map[string]string, nets []string) (*NetworkSet, error) {
	key := "global/" + name
	if namespace != "" {
		key = namespace + "/" + name
	}
	s := &NetworkSet{Key: key, Namespace: namespace, Labels: labels.Set(lbls)}
	var errs []error
	for i, n := range nets {
		pfx, err := parseCalicoNet(n)
		if err != nil {
			errs = append(errs, fmt.Errorf("spec.nets[%d]: %w", i, err))
			continue
		}
		s.Nets = append(s.Nets, pfx)
	}
	return s, errors.Join(errs...)
}

// convertCalico converts a policy kind; what fails makes a policy that
// fails closed.
func convertCalico(c *calicoPolicy, tiers TierLookup) *Policy {
	p := &Policy{Key: c.key, Name: c.name, Namespace: c.namespace, Order: NoOrder, Staged: c.staged}
	if c.order != nil {
		p.Order = *c.order
	}
	// "If types is not specified, Calico defaults it: Ingress if there
	// are no egress rules (so also with no rules at all), Egress if there
	// are egress rules."
	p.Ingress, p.Egress = len(c.ingress) > 0 || len(c.egress) == 0, len(c.egress) > 0
	if len(c.types) > 0 {
		p.Ingress, p.Egress = false, false
	}
	var problem error
	for i, t := range c.types {
		switch t {
		case v3.PolicyTypeIngress:
			p.Ingress = true
		case v3.PolicyTypeEgress:
			p.Egress = true
		default:
			p.Ingress, p.Egress = true, true
			problem = errors.Join(problem, fmt.Errorf("spec.types[%d]: %q is neither Ingress nor Egress", i, t))
		}
	}
	tierName := c.tier
	if tierName == "" {
		tierName = DefaultTierName // "an empty tier means default"
	}
	if p.Tier = tiers(tierName); p.Tier == nil {
		// Where it would sit is unknown; the default tier keeps it
		// closed among the Kubernetes policies.
		p.Tier = DefaultTier()
		problem = errors.Join(problem, fmt.Errorf("spec.tier: tier %q does not exist", tierName))
	}
	if err := p.convertSubject(c); err != nil {
		problem = errors.Join(problem, err)
	}
	if c.hostOnly != "" {
		problem = errors.Join(problem, fmt.Errorf("%s: applies to host endpoints only, which Sluice does not enforce", c.hostOnly))
	}
	if problem == nil {
		problem = p.convertCalicoRules(c)
	}
	if problem != nil {
		return p.failClosed(problem)
	}
	return p
}

// failClosed marks a Calico policy that cannot be translated: it keeps
// the subject and directions it could read and denies all in them.
func (p *Policy) failClosed(err error) *Policy {
	p.Broken = strings.ReplaceAll(err.Error(), "\n", "; ")
	p.IngressRules, p.EgressRules = nil, nil
	if p.Ingress {
		p.IngressRules = []Rule{{Action: Deny}}
	}
	if p.Egress {
		p.EgressRules = []Rule{{Action: Deny}}
	}
	return p
}

// convertSubject converts whom the policy selects. An unreadable selector
// selects everything in its scope: the policy then fails closed for more
// endpoints, never for fewer.
func (p *Policy) convertSubject(c *calicoPolicy) error {
	var errs []error
	sel, err := ParseCalicoSelector(c.selector)
	if err == nil && strings.Contains(c.selector, "global(") {
		err = fmt.Errorf("global() selects no endpoint a policy can apply to")
	}
	if err != nil {
		sel, _ = ParseCalicoSelector("all()")
		errs = append(errs, fmt.Errorf("spec.selector: %w", err))
	}
	p.PodSelector = sel
	if c.global && c.nsSelector != "" {
		ns, err := ParseCalicoSelector(c.nsSelector)
		if err != nil {
			errs = append(errs, fmt.Errorf("spec.namespaceSelector: %w", err))
		} else {
			p.NamespaceSelector = ns
		}
	}
	if c.saSelector != "" {
		sa, err := ParseCalicoSelector(c.saSelector)
		if err != nil {
			errs = append(errs, fmt.Errorf("spec.serviceAccountSelector: %w", err))
		} else {
			p.ServiceAccounts = &ServiceAccountMatch{Selector: sa}
		}
	}
	return errors.Join(errs...)
}

func (p *Policy) convertCalicoRules(c *calicoPolicy) error {
	for _, dir := range []struct {
		field string
		in    []v3.Rule
		out   *[]Rule
		on    bool
	}{{"spec.ingress", c.ingress, &p.IngressRules, p.Ingress}, {"spec.egress", c.egress, &p.EgressRules, p.Egress}} {
		if !dir.on {
			continue // rules of a direction the policy does not apply to
		}
		for i := range dir.in {
			r, err := convertCalicoRule(c, &dir.in[i])
			if err != nil {
				return fmt.Errorf("%s[%d]%w", dir.field, i, err)
			}
			*dir.out = append(*dir.out, r)
		}
	}
	return nil
}

// convertCalicoRule converts one rule; errors begin with the field inside
// the rule (".destination.ports[1]: ...").
func convertCalicoRule(c *calicoPolicy, in *v3.Rule) (Rule, error) {
	r := Rule{Action: Action(in.Action)}
	switch r.Action {
	case Allow, Deny, Pass, Log:
	default:
		return r, fmt.Errorf(".action: %q is not Allow, Deny, Pass or Log", in.Action)
	}
	switch {
	case in.HTTP != nil:
		return r, fmt.Errorf(".http: HTTP matches need an L7 proxy, which Sluice does not have")
	case in.Source.Services != nil:
		return r, fmt.Errorf(".source.services: service matches are not enforced by Sluice")
	case in.Destination.Services != nil:
		return r, fmt.Errorf(".destination.services: service matches are not enforced by Sluice")
	}
	if in.IPVersion != nil {
		if *in.IPVersion != 4 && *in.IPVersion != 6 {
			return r, fmt.Errorf(".ipVersion: %d is neither 4 nor 6", *in.IPVersion)
		}
		r.IPVersion = *in.IPVersion
	}
	var err error
	if r.Protocol, err = convertProtocol(in.Protocol); err != nil {
		return r, fmt.Errorf(".protocol: %w", err)
	}
	if r.NotProtocol, err = convertProtocol(in.NotProtocol); err != nil {
		return r, fmt.Errorf(".notProtocol: %w", err)
	}
	if r.Protocol != "" && r.Protocol == r.NotProtocol {
		return r, fmt.Errorf(".notProtocol: %q is also the protocol; the rule could match nothing", r.Protocol)
	}
	if r.Protocol != "" {
		r.NotProtocol = "" // implied by the protocol
	}
	if r.ICMP, err = convertICMP(in.ICMP, r); err != nil {
		return r, fmt.Errorf(".icmp%w", err)
	}
	if r.NotICMP, err = convertICMP(in.NotICMP, r); err != nil {
		return r, fmt.Errorf(".notICMP%w", err)
	}
	if r.Src, err = convertEntity(c, &in.Source, r); err != nil {
		return r, fmt.Errorf(".source%w", err)
	}
	if r.Dst, err = convertEntity(c, &in.Destination, r); err != nil {
		return r, fmt.Errorf(".destination%w", err)
	}
	return r, nil
}

// convertProtocol reads a protocol by name (any case) or number, and
// names the numbers that have names.
func convertProtocol(p *numorstring.Protocol) (Protocol, error) {
	if p == nil {
		return "", nil
	}
	if p.Type == numorstring.NumOrStringNum {
		switch p.NumVal {
		case 0:
			return "", fmt.Errorf("0 is not a protocol number")
		case 1:
			return ICMP, nil
		case 6:
			return TCP, nil
		case 17:
			return UDP, nil
		case 58:
			return ICMPv6, nil
		case 132:
			return SCTP, nil
		case 136:
			return UDPLite, nil
		}
		return Protocol(fmt.Sprint(p.NumVal)), nil
	}
	for _, n := range []Protocol{TCP, UDP, SCTP, ICMP, ICMPv6, UDPLite} {
		if strings.EqualFold(string(n), p.StrVal) {
			return n, nil
		}
	}
	return "", fmt.Errorf("%q is not TCP, UDP, SCTP, ICMP, ICMPv6, UDPLite or a number 1-255", p.StrVal)
}

// convertICMP converts an icmp or notICMP match: it needs the protocol
// ICMP or ICMPv6, and a code needs a type. Errors begin with the field
// (".type: ...").
func convertICMP(f *v3.ICMPFields, r Rule) (*ICMPMatch, error) {
	if f == nil {
		return nil, nil
	}
	if !isICMP(r.Protocol) {
		return nil, fmt.Errorf(": needs protocol ICMP or ICMPv6, not %q", r.Protocol)
	}
	if r.Protocol == ICMP && r.IPVersion == 6 || r.Protocol == ICMPv6 && r.IPVersion == 4 {
		return nil, fmt.Errorf(": protocol %s does not exist in IP version %d", r.Protocol, r.IPVersion)
	}
	if f.Type == nil {
		if f.Code != nil {
			return nil, fmt.Errorf(".code: needs a type")
		}
		return nil, fmt.Errorf(": needs a type")
	}
	if *f.Type < 0 || *f.Type > 254 {
		return nil, fmt.Errorf(".type: %d is out of range 0-254", *f.Type)
	}
	m := &ICMPMatch{Type: int32(*f.Type), Code: -1}
	if f.Code != nil {
		if *f.Code < 0 || *f.Code > 255 {
			return nil, fmt.Errorf(".code: %d is out of range 0-255", *f.Code)
		}
		m.Code = int32(*f.Code)
	}
	return m, nil
}

// convertEntity converts a source or destination.
func convertEntity(c *calicoPolicy, e *v3.EntityRule, r Rule) (Match, error) {
	var m Match
	var err error
	if m.Nets, err = convertNets(e.Nets, r.IPVersion, ".nets"); err != nil {
		return m, err
	}
	if len(e.Nets) > 0 && m.Nets == nil {
		m.Nets = []netip.Prefix{} // none in this IP version: matches nothing
	}
	if m.NotNets, err = convertNets(e.NotNets, r.IPVersion, ".notNets"); err != nil {
		return m, err
	}
	scope, err := entityScope(c, e)
	if err != nil {
		return m, err
	}
	if e.Selector != "" || e.NamespaceSelector != "" || e.ServiceAccounts != nil {
		if m.Selector, err = entitySelector(scope, e.Selector, ".selector"); err != nil {
			return m, err
		}
		if e.ServiceAccounts != nil {
			if m.Selector.ServiceAccounts, err = convertSAMatch(e.ServiceAccounts); err != nil {
				return m, err
			}
		}
	}
	if e.NotSelector != "" {
		if m.NotSelector, err = entitySelector(scope, e.NotSelector, ".notSelector"); err != nil {
			return m, err
		}
	}
	if m.Ports, err = convertCalicoPorts(e.Ports, r, ".ports"); err != nil {
		return m, err
	}
	m.NotPorts, err = convertCalicoPorts(e.NotPorts, r, ".notPorts")
	return m, err
}

// entityScope is where a rule's selectors look: "selector ... matches
// endpoints and network sets in the policy's namespace" unless
// namespaceSelector says which namespaces (global(): the global network
// sets); in a global policy, every namespace and the global sets.
func entityScope(c *calicoPolicy, e *v3.EntityRule) (PodPeer, error) {
	scope := PodPeer{Namespace: c.namespace, NetworkSets: true}
	switch ns := strings.TrimSpace(e.NamespaceSelector); {
	case ns == "global()":
		scope.OnlyGlobal, scope.Global = true, true
	case ns != "":
		sel, err := ParseCalicoSelector(ns)
		if err != nil {
			return scope, fmt.Errorf(".namespaceSelector: %w", err)
		}
		scope.Namespaces = sel
	case c.global:
		scope.Namespaces, scope.Global = labels.Everything(), true
	}
	return scope, nil
}

func entitySelector(scope PodPeer, s, field string) (*PodPeer, error) {
	if strings.Contains(s, "global(") {
		// It would select everything here.
		return nil, fmt.Errorf("%s: global() can only be used in a namespaceSelector", field)
	}
	sel, err := ParseCalicoSelector(s)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", field, err)
	}
	pp := scope
	pp.Pods = sel
	return &pp, nil
}

func convertSAMatch(sa *v3.ServiceAccountMatch) (*ServiceAccountMatch, error) {
	out := &ServiceAccountMatch{Names: sa.Names}
	if sa.Selector != "" {
		sel, err := ParseCalicoSelector(sa.Selector)
		if err != nil {
			return nil, fmt.Errorf(".serviceAccounts.selector: %w", err)
		}
		out.Selector = sel
	}
	return out, nil
}

// convertNets parses nets, leaving out those of the other IP version
// when the rule has one (Calico rejects them; they could never match).
func convertNets(nets []string, ipVersion int, field string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for i, n := range nets {
		pfx, err := parseCalicoNet(n)
		if err != nil {
			return nil, fmt.Errorf("%s[%d]: %w", field, i, err)
		}
		if ipVersion == 4 && pfx.Addr().Is6() || ipVersion == 6 && pfx.Addr().Is4() {
			return nil, fmt.Errorf("%s[%d]: %s is not IP version %d", field, i, n, ipVersion)
		}
		out = append(out, pfx)
	}
	return out, nil
}

// parseCalicoNet parses a CIDR, or an address meaning its host prefix.
func parseCalicoNet(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not a CIDR or an address", s)
		}
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	return parseBlockPrefix(s)
}

// convertCalicoPorts converts ports: "ports are only valid with protocol
// TCP, UDP or SCTP"; numbers, "min:max" ranges and names.
func convertCalicoPorts(ports []numorstring.Port, r Rule, field string) ([]Port, error) {
	if len(ports) == 0 {
		return nil, nil
	}
	switch r.Protocol {
	case TCP, UDP, SCTP:
	default:
		return nil, fmt.Errorf("%s: ports need protocol TCP, UDP or SCTP, not %q", field, r.Protocol)
	}
	var out []Port
	for i, pt := range ports {
		switch {
		case pt.PortName != "":
			if pt.MinPort != 0 || pt.MaxPort != 0 {
				return nil, fmt.Errorf("%s[%d]: a named port cannot have numbers", field, i)
			}
			out = append(out, Port{Protocol: r.Protocol, Name: pt.PortName})
		case pt.MinPort == 0 || pt.MaxPort < pt.MinPort:
			return nil, fmt.Errorf("%s[%d]: %d:%d is not a port range in 1-65535", field, i, pt.MinPort, pt.MaxPort)
		case pt.MinPort == pt.MaxPort:
			out = append(out, Port{Protocol: r.Protocol, Number: int32(pt.MinPort)})
		default:
			out = append(out, Port{Protocol: r.Protocol, Number: int32(pt.MinPort), EndPort: int32(pt.MaxPort)})
		}
	}
	return out, nil
}

// stagedAsNetworkPolicy is the NetworkPolicy a staged one would be.
func stagedAsNetworkPolicy(sk *v3.StagedKubernetesNetworkPolicy) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{ObjectMeta: sk.ObjectMeta, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: sk.Spec.PodSelector, Ingress: sk.Spec.Ingress, Egress: sk.Spec.Egress, PolicyTypes: sk.Spec.PolicyTypes}}
}
