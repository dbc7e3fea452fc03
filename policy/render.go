package policy

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"

	"github.com/sluice-net/sluice/internal/contract"
)

// The chains and sets the policy loop renders, in the design Calico's Felix
// arrived at:
//
//	SLUICE-FROM-POD / SLUICE-TO-POD (package contract names them, package
//	forward hooks them)
//	  dispatch by interface name through a prefix tree, ending in DROP for
//	  any Sluice interface that is not programmed yet
//	SLUICE-FW-<veth> / SLUICE-TW-<veth>: one per local endpoint and direction
//	  conntrack first, then a jump to each policy that selects the endpoint
//	SLUICE-PE-<hash> / SLUICE-PI-<hash>: one per policy and direction,
//	  shared by every endpoint the policy selects
//
// Peers live in ipsets keyed by a hash of the normalised selector, so an
// endpoint's rules grow with the policies that select it, not with the
// number of pods.
const (
	chainPrefix    = "SLUICE-"
	setPrefix      = "SLUICE-"
	dispatchBucket = 1 // hex characters of the first dispatch level
)

// LocalEndpoint is a pod endpoint on this node, as the renderer needs it:
// its pod, its host veth and the policies selecting it.
type LocalEndpoint struct {
	Pod      *Pod
	HostVeth string // sl + 11 hex
	// IPs are the endpoint's addresses as the CNI plugin assigned them;
	// when empty, the pod's.
	IPs []netip.Addr
	// Ingress and Egress are the keys of the policies selecting it, in
	// order, per direction.
	Ingress, Egress []string
}

// SetType is an ipset type.
type SetType string

const (
	HashNet    SetType = "hash:net"
	HashIPPort SetType = "hash:ip,port"
)

// Set is an ipset's wanted content.
type Set struct {
	Name    string
	Type    SetType
	IPv6    bool
	Entries []string // "10.0.0.0/8", "10.0.0.0/24 nomatch", "10.1.2.3,tcp:80"
	// signature caches setSignature; Entries must not change once it is set.
	signature string
}

// Ruleset is everything the policy loop renders for one family.
type Ruleset struct {
	// Chains maps chain names to their rules ("-A CHAIN ..." lines).
	Chains map[string][]string
	Sets   map[string]*Set
}

// Renderer turns policies and endpoints into rules.
type Renderer struct {
	IPv6 bool
	// AcceptMark is the mark bit a policy chain sets to say "allowed"; it
	// must not overlap kube-proxy's 0x4000 and 0x8000.
	AcceptMark uint32
	// PortTreeThreshold is the number of policies selecting an endpoint in
	// a direction above which it dispatches on ports (see porttree.go);
	// 0 means DefaultPortTreeThreshold.
	PortTreeThreshold int
}

func shortHash(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])[:16]
}

func (r *Renderer) fam() string {
	if r.IPv6 {
		return "6"
	}
	return "4"
}

// PolicyChain names a policy's chain of a direction.
func PolicyChain(key string, egress bool) string {
	if egress {
		return chainPrefix + "PE-" + shortHash(key)
	}
	return chainPrefix + "PI-" + shortHash(key)
}

// EndpointChain names an endpoint's chain: FW is traffic from the pod
// (egress), TW traffic to it (ingress).
func EndpointChain(veth string, egress bool) string {
	suffix := strings.TrimPrefix(veth, contract.HostVethPrefix)
	if egress {
		return chainPrefix + "FW-" + suffix
	}
	return chainPrefix + "TW-" + suffix
}

func (r *Renderer) mark() string {
	return fmt.Sprintf("0x%x/0x%x", r.AcceptMark, r.AcceptMark)
}

// selectorSetName names the set of the IPs of the pods a peer selects.
func (r *Renderer) selectorSetName(pp *PodPeer) string {
	return setPrefix + "S" + r.fam() + "-" + shortHash(normalisedPeer(pp))
}

func normalisedPeer(pp *PodPeer) string {
	ns := "own=" + pp.Namespace
	if pp.Namespaces != nil {
		ns = "nssel=" + pp.Namespaces.String()
	}
	return ns + ";pods=" + pp.Pods.String()
}

func (r *Renderer) cidrSetName(p *Peer) string {
	ex := make([]string, 0, len(p.Except))
	for _, e := range p.Except {
		ex = append(ex, e.String())
	}
	sort.Strings(ex)
	return setPrefix + "C" + r.fam() + "-" + shortHash(p.CIDR.String()+";except="+strings.Join(ex, ","))
}

// IPBlockSetName names the ipset that holds an ipBlock peer in a family,
// for troubleshooting ("which set is this block?") and tests.
func IPBlockSetName(cidr netip.Prefix, except []netip.Prefix, ipv6 bool) string {
	masked := make([]netip.Prefix, 0, len(except))
	for _, e := range except {
		masked = append(masked, e.Masked())
	}
	return (&Renderer{IPv6: ipv6}).cidrSetName(&Peer{CIDR: cidr.Masked(), Except: masked})
}

func (r *Renderer) namedPortSetName(scope, name string, proto Protocol) string {
	return setPrefix + "N" + r.fam() + "-" + shortHash(scope+";port="+name+";"+string(proto))
}

// Render computes the whole ruleset of one family from scratch. The
// policy loop keeps an incremental copy of the same result (index.go);
// Render is its reference, and the tests hold the two equal.
func (r *Renderer) Render(policies map[string]*Policy, endpoints []LocalEndpoint, pods []*Pod, namespaces map[string]*Namespace) *Ruleset {
	rs := &Ruleset{Chains: map[string][]string{}, Sets: map[string]*Set{}}
	used := map[policyChainRef]bool{}
	for _, ep := range endpoints {
		for _, k := range ep.Ingress {
			used[policyChainRef{k, false}] = true
		}
		for _, k := range ep.Egress {
			used[policyChainRef{k, true}] = true
		}
	}
	keys := make([]string, 0, len(policies))
	for k := range policies {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		p := policies[k]
		for _, egress := range []bool{false, true} {
			if !used[policyChainRef{k, egress}] {
				continue
			}
			rules, defs := r.policyRules(p, egress)
			rs.Chains[PolicyChain(k, egress)] = rules
			for _, d := range defs {
				if _, ok := rs.Sets[d.name]; !ok {
					rs.Sets[d.name] = r.materialise(d, pods, namespaces)
				}
			}
		}
	}
	for _, ep := range endpoints {
		self := ep.IPs
		if len(self) == 0 && ep.Pod != nil {
			self = ep.Pod.IPs
		}
		maps.Copy(rs.Chains, r.endpointChains(ep.HostVeth, self, ep.Ingress, policies, false))
		maps.Copy(rs.Chains, r.endpointChains(ep.HostVeth, self, ep.Egress, policies, true))
	}
	r.dispatch(rs, endpoints, true)
	r.dispatch(rs, endpoints, false)
	return rs
}

// policyChainRef is a policy's chain in one direction: the policy's key,
// and whether it is the egress chain.
type policyChainRef struct {
	key    string
	egress bool
}

// materialise computes a set's entries over every pod.
func (r *Renderer) materialise(d *setDef, pods []*Pod, namespaces map[string]*Namespace) *Set {
	set := &Set{Name: d.name, Type: d.typ, IPv6: r.IPv6, Entries: slices.Clone(d.static)}
	for _, pod := range pods {
		set.Entries = append(set.Entries, r.podEntries(d, pod, namespaces[pod.Namespace])...)
	}
	sortEntries(set)
	return set
}

// endpointChains renders an endpoint's chain of a direction, and its port
// tree when enough policies select it.
func (r *Renderer) endpointChains(veth string, self []netip.Addr, keys []string, policies map[string]*Policy, egress bool) map[string][]string {
	chain := EndpointChain(veth, egress)
	threshold := r.PortTreeThreshold
	if threshold == 0 {
		threshold = DefaultPortTreeThreshold
	}
	if len(keys) <= threshold {
		return map[string][]string{chain: r.endpointRules(chain, self, keys, egress)}
	}
	head := r.endpointRules(chain, self, nil, egress)
	head = head[:len(head)-1] // "no policy isolates this pod"
	head = append(head, r.selfRules(chain, self, egress)...)
	head = append(head, fmt.Sprintf("-A %s -j MARK --set-xmark 0x0/0x%x", chain, r.AcceptMark))
	t := &portTree{r: r, suffix: strings.TrimPrefix(veth, contract.HostVethPrefix), egress: egress, chains: map[string][]string{}}
	t.chains[chain] = append(head, t.render(chain, keys, policies)...)
	return t.chains
}

func (r *Renderer) endpointRules(chain string, self []netip.Addr, policies []string, egress bool) []string {
	rules := []string{
		fmt.Sprintf("-A %s -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN", chain),
		fmt.Sprintf("-A %s -m conntrack --ctstate INVALID -j DROP", chain),
	}
	if len(policies) == 0 {
		return append(rules, fmt.Sprintf("-A %s -m comment --comment \"no policy isolates this pod\" -j RETURN", chain))
	}
	rules = append(rules, r.selfRules(chain, self, egress)...)
	rules = append(rules, fmt.Sprintf("-A %s -j MARK --set-xmark 0x0/0x%x", chain, r.AcceptMark))
	for _, k := range policies {
		rules = append(rules,
			fmt.Sprintf("-A %s -j %s", chain, PolicyChain(k, egress)),
			fmt.Sprintf("-A %s -m mark --mark %s -j RETURN", chain, r.mark()))
	}
	return append(rules, fmt.Sprintf("-A %s -m comment --comment \"no policy allowed it\" -j DROP", chain))
}

// selfRules let a pod reach itself through its own Service: kube-proxy
// DNATs the ClusterIP back to the pod, and the packet leaves and re-enters
// the pod's veth, from the pod's address to the pod's address (the
// hairpin's masquerade comes later, in POSTROUTING). Policy never applies
// to a pod talking to itself, as for its own address inside the pod.
// Anti-spoofing guarantees that a packet with the pod's source address
// came from the pod.
func (r *Renderer) selfRules(chain string, self []netip.Addr, egress bool) []string {
	match := "-s"
	if egress {
		match = "-d"
	}
	var rules []string
	for _, ip := range self {
		if ip.Is6() == r.IPv6 {
			rules = append(rules, fmt.Sprintf("-A %s %s %s -m comment --comment \"the pod itself, through its own Service\" -j RETURN", chain, match, netip.PrefixFrom(ip, ip.BitLen())))
		}
	}
	return rules
}

// dispatch renders the prefix tree: the top chain sends each first hex
// character to its bucket, each bucket sends each interface to its
// endpoint chain, and both end in DROP for Sluice interfaces that are not
// programmed, so a pod whose endpoint is not ready sends and receives
// nothing.
func (r *Renderer) dispatch(rs *Ruleset, endpoints []LocalEndpoint, egress bool) {
	top, dir := contract.ToPodChain, "-o"
	if egress {
		top, dir = contract.FromPodChain, "-i"
	}
	buckets := map[string][]string{}
	for _, ep := range endpoints {
		suffix := strings.TrimPrefix(ep.HostVeth, contract.HostVethPrefix)
		if len(suffix) < dispatchBucket {
			continue
		}
		b := suffix[:dispatchBucket]
		buckets[b] = append(buckets[b], ep.HostVeth)
	}
	names := make([]string, 0, len(buckets))
	for b := range buckets {
		names = append(names, b)
	}
	sort.Strings(names)
	var topRules []string
	for _, b := range names {
		bucket := top + "-" + b
		topRules = append(topRules, fmt.Sprintf("-A %s %s %s%s+ -g %s", top, dir, contract.HostVethPrefix, b, bucket))
		vs := buckets[b]
		sort.Strings(vs)
		var rules []string
		for _, v := range vs {
			rules = append(rules, fmt.Sprintf("-A %s %s %s -g %s", bucket, dir, v, EndpointChain(v, egress)))
		}
		rules = append(rules, fmt.Sprintf("-A %s -m comment --comment \"endpoint not programmed yet\" -j DROP", bucket))
		rs.Chains[bucket] = rules
	}
	topRules = append(topRules, fmt.Sprintf("-A %s -m comment --comment \"endpoint not programmed yet\" -j DROP", top))
	rs.Chains[top] = topRules
}

// setDef says what a set holds: fixed entries (an ipBlock) or entries
// contributed by each pod (the IPs of the pods a selector matches, or the
// IP and port of the pods that declare a named port). A set's name is a
// hash of its definition, so equal names mean equal content, and sets are
// shared by every policy that needs them.
type setDef struct {
	name   string
	typ    SetType
	static []string
	// peer: the IPs of the pods it matches.
	peer *PodPeer
	// namedPort: "ip,proto:port" of the pods that declare it; ingress
	// sets only count the pods the policy selects (selectedBy).
	namedPort  string
	proto      Protocol
	selectedBy *Policy
	// field is where in the policy the set comes from, for reports.
	field string
}

// podEntries returns what one pod contributes to a set in this family.
func (r *Renderer) podEntries(d *setDef, pod *Pod, ns *Namespace) []string {
	var out []string
	switch {
	case d.peer != nil:
		if !d.peer.Matches(pod, ns) {
			return nil
		}
		for _, ip := range pod.IPs {
			if ip.Is6() == r.IPv6 {
				out = append(out, netip.PrefixFrom(ip, ip.BitLen()).String())
			}
		}
	case d.namedPort != "":
		if d.selectedBy != nil && !d.selectedBy.Selects(pod) {
			return nil
		}
		np, ok := pod.NamedPorts[d.namedPort]
		if !ok || np.Protocol != d.proto {
			return nil
		}
		for _, ip := range pod.IPs {
			if ip.Is6() == r.IPv6 {
				out = append(out, fmt.Sprintf("%s,%s:%d", ip, strings.ToLower(string(d.proto)), np.Number))
			}
		}
	}
	return out
}

// policyRules renders one policy's chain of a direction, and the sets it
// refers to: each rule sets the accept mark for the traffic it allows and
// returns. It depends on the policy alone, so the loop renders a policy
// again only when the policy changes.
func (r *Renderer) policyRules(p *Policy, egress bool) ([]string, []*setDef) {
	chain := PolicyChain(p.Key, egress)
	if p.Broken != "" {
		// Fail closed: the chain allows nothing, so the endpoint chain's
		// final DROP applies.
		return []string{fmt.Sprintf("-A %s -m comment --comment \"%s\" -j RETURN", chain, comment("broken policy allows nothing: "+p.Broken))}, nil
	}
	rules := p.IngressRules
	peerDir, field, peersField := "src", "spec.ingress", "from"
	if egress {
		rules = p.EgressRules
		peerDir, field, peersField = "dst", "spec.egress", "to"
	}
	var out []string
	var defs []*setDef
	for i := range rules {
		rule := &rules[i]
		ruleField := fmt.Sprintf("%s[%d]", field, i)
		peerMatches, peerDefs := r.peerMatches(rule, peerDir, ruleField+"."+peersField)
		if peerMatches == nil {
			continue // peers that select nothing in this family
		}
		defs = append(defs, peerDefs...)
		ports, portDefs := r.portMatches(p, rule, egress, ruleField+".ports")
		defs = append(defs, portDefs...)
		for _, pm := range peerMatches {
			for _, port := range ports {
				// iptables-save's canonical order: protocol, then the
				// matches in the order given, so a re-read compares equal.
				parts := []string{"-A", chain}
				for _, m := range []string{port.proto, pm, port.rest} {
					if m != "" {
						parts = append(parts, m)
					}
				}
				out = append(out, strings.Join(parts, " ")+fmt.Sprintf(" -j MARK --set-xmark %s", r.mark()))
			}
		}
	}
	out = append(out, fmt.Sprintf("-A %s -m mark --mark %s -j RETURN", chain, r.mark()))
	return out, defs
}

// peerMatches returns one match per peer ("" for every peer), or nil when
// the rule's peers can never match in this family, and the sets they use.
func (r *Renderer) peerMatches(rule *Rule, dir, field string) ([]string, []*setDef) {
	if rule.Peers == nil {
		return []string{""}, nil
	}
	var out []string
	var defs []*setDef
	for i := range rule.Peers {
		peer := &rule.Peers[i]
		if peer.Pods != nil {
			d := &setDef{name: r.selectorSetName(peer.Pods), typ: HashNet, peer: peer.Pods, field: fmt.Sprintf("%s[%d]", field, i)}
			defs = append(defs, d)
			out = append(out, fmt.Sprintf("-m set --match-set %s %s", d.name, dir))
			continue
		}
		if peer.CIDR.Addr().Is6() != r.IPv6 {
			continue
		}
		entries := ipBlockEntries(peer.CIDR, peer.Except)
		if entries == nil {
			continue // its excepts cover the whole block: it matches nothing
		}
		d := &setDef{name: r.cidrSetName(peer), typ: HashNet, static: entries, field: fmt.Sprintf("%s[%d].ipBlock", field, i)}
		defs = append(defs, d)
		out = append(out, fmt.Sprintf("-m set --match-set %s %s", d.name, dir))
	}
	return out, defs
}

// portMatch is a rule's port match: the protocol part (which iptables
// puts first) and the rest.
type portMatch struct{ proto, rest string }

// portMatches returns one match per port (empty for every port), and the
// sets they use. A named port becomes a hash:ip,port set of the
// destination pods that declare it: for ingress the pods the policy
// selects, for egress every pod (the peer match narrows it).
func (r *Renderer) portMatches(p *Policy, rule *Rule, egress bool, field string) ([]portMatch, []*setDef) {
	if rule.Ports == nil {
		return []portMatch{{}}, nil
	}
	var out []portMatch
	var defs []*setDef
	for i, pt := range rule.Ports {
		proto := strings.ToLower(string(pt.Protocol))
		pm := portMatch{proto: "-p " + proto}
		switch {
		case pt.Name != "":
			d := &setDef{typ: HashIPPort, namedPort: pt.Name, proto: pt.Protocol, field: fmt.Sprintf("%s[%d]", field, i)}
			scope := "egress"
			if !egress {
				// Named by the pods the policy selects, so policies with
				// the same pod selector share the set.
				d.selectedBy = p
				scope = "ingress:" + p.Namespace + ";" + p.PodSelector.String()
			}
			d.name = r.namedPortSetName(scope, pt.Name, pt.Protocol)
			defs = append(defs, d)
			pm.rest = fmt.Sprintf("-m set --match-set %s dst,dst", d.name)
		case pt.Number == 0:
		case pt.EndPort != 0:
			pm.rest = fmt.Sprintf("-m %s --dport %d:%d", proto, pt.Number, pt.EndPort)
		default:
			pm.rest = fmt.Sprintf("-m %s --dport %d", proto, pt.Number)
		}
		out = append(out, pm)
	}
	return out, defs
}

func sortEntries(s *Set) { slices.Sort(s.Entries) }

// comment makes text safe inside an iptables comment: no double quotes or
// backslashes (iptables-restore does not unescape them), at most 200 bytes
// (the kernel's limit is 256).
func comment(s string) string {
	s = strings.NewReplacer(`"`, "'", `\`, "/", "\n", " ").Replace(s)
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

// ipBlockEntries returns the hash:net entries of an ipBlock: the block,
// then each except as a nomatch entry (hash:net picks the most specific
// entry, so an address in an except does not match). It returns nil when
// the excepts leave nothing.
//
// A hash:net set cannot hold a /0, so 0.0.0.0/0 and ::/0 become their two
// /1 halves: the set stays the one way every ipBlock is matched, and the
// except entries keep working inside it. Excepts that lie outside the
// block, or in another family, change nothing and are left out; an except
// that covers the block (or one half of a /0) removes it.
func ipBlockEntries(cidr netip.Prefix, except []netip.Prefix) []string {
	blocks := []netip.Prefix{cidr}
	if cidr.Bits() == 0 {
		blocks = halves(cidr)
	}
	var excepts []netip.Prefix
	for _, e := range except {
		e = e.Masked()
		keep := blocks[:0]
		for _, b := range blocks {
			if !e.Overlaps(b) || e.Bits() > b.Bits() {
				keep = append(keep, b)
			}
		}
		blocks = keep
		if e.Addr().Is6() == cidr.Addr().Is6() && cidr.Contains(e.Addr()) && e.Bits() > cidr.Bits() {
			excepts = append(excepts, e)
		}
	}
	if len(blocks) == 0 {
		return nil
	}
	seen := map[netip.Prefix]bool{}
	var out []string
	for _, b := range blocks {
		seen[b] = true
		out = append(out, b.String())
	}
	for _, e := range excepts {
		if seen[e] || !coveredBy(blocks, e) {
			continue // a duplicate, or inside a half an except removed
		}
		seen[e] = true
		out = append(out, e.String()+" nomatch")
	}
	return out
}

// halves splits a /0 into its two /1 halves.
func halves(all netip.Prefix) []netip.Prefix {
	lo := netip.PrefixFrom(all.Addr(), 1)
	hi := netip.IPv4Unspecified()
	if all.Addr().Is6() {
		hi = netip.IPv6Unspecified()
	}
	b := hi.AsSlice()
	b[0] = 0x80
	hiAddr, _ := netip.AddrFromSlice(b)
	return []netip.Prefix{lo, netip.PrefixFrom(hiAddr, 1)}
}

func coveredBy(blocks []netip.Prefix, p netip.Prefix) bool {
	for _, b := range blocks {
		if b.Contains(p.Addr()) && p.Bits() >= b.Bits() {
			return true
		}
	}
	return false
}

// SetField says where in a policy a set comes from ("spec.ingress[0].from[1]"),
// for reporting a set the kernel refused; "" if the policy uses no such set.
func (r *Renderer) SetField(p *Policy, egress bool, set string) string {
	_, defs := r.policyRules(p, egress)
	for _, d := range defs {
		if d.name == set {
			return d.field
		}
	}
	return ""
}
