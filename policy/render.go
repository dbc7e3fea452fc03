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
//	  conntrack first, then one block per tier that selects the endpoint
//	  (rules.go): clear the pass mark, jump to each of the tier's policies
//	  while it is clear, return once one accepted, and drop at the end of
//	  the tier unless its default action is Pass
//	SLUICE-PE-<hash> / SLUICE-PI-<hash>: one per policy and direction,
//	  shared by every endpoint the policy selects: per rule, Allow sets the
//	  accept mark and returns, Deny drops, Pass sets the pass mark and
//	  returns, Log sends the packet to NFLOG and goes on
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
	// PassMark is the mark bit a policy chain sets to say "pass to the
	// next tier"; zero picks the next free bit above AcceptMark.
	PassMark uint32
	// LogGroup is the NFLOG group of Log rules (zero: DefaultLogGroup).
	LogGroup uint16
	// DropLog logs the first packet of each connection policy drops,
	// rate-limited per endpoint (droplog.go).
	DropLog bool
}

// DefaultLogGroup is the NFLOG group Log rules write to, unless the
// Renderer says otherwise.
const DefaultLogGroup = 20

func (r *Renderer) passMark() uint32 {
	if r.PassMark != 0 {
		return r.PassMark
	}
	m := r.AcceptMark << 1
	for m != 0 && m&0xc000 != 0 { // kube-proxy's bits
		m <<= 1
	}
	return m
}

func (r *Renderer) logGroup() uint16 {
	if r.LogGroup != 0 {
		return r.LogGroup
	}
	return DefaultLogGroup
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

// normalisedPeer is a peer's identity: Kubernetes peers keep the form
// they always had (so their set names do not change); Calico selectors
// add their kind and scope.
func normalisedPeer(pp *PodPeer) string {
	ns := "own=" + pp.Namespace
	if pp.Namespaces != nil {
		ns = "nssel=" + selectorID(pp.Namespaces)
	}
	out := ns + ";pods=" + selectorID(pp.Pods)
	if pp.NetworkSets {
		out += fmt.Sprintf(";netsets;global=%v;only=%v", pp.Global, pp.OnlyGlobal)
	}
	if pp.Nodes {
		out += ";nodes"
	}
	if sa := pp.ServiceAccounts; sa != nil {
		out += ";sa=" + strings.Join(sa.Names, ",")
		if sa.Selector != nil {
			out += ";sasel=" + selectorID(sa.Selector)
		}
	}
	return out
}

// selectorID is a selector's canonical string, tagged with its language
// unless it is a Kubernetes label selector: "a == 'b'" in Calico's and
// "a=b" in Kubernetes' must never share a set by accident.
func selectorID(s Selector) string {
	if c, ok := s.(interface{ Language() string }); ok {
		return c.Language() + ":" + s.String()
	}
	return s.String()
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
	return r.RenderWithSets(policies, endpoints, pods, namespaces, nil)
}

// RenderWithSets is Render with the network sets Calico selectors can
// select.
func (r *Renderer) RenderWithSets(policies map[string]*Policy, endpoints []LocalEndpoint, pods []*Pod, namespaces map[string]*Namespace, netsets []*NetworkSet) *Ruleset {
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
					rs.Sets[d.name] = r.materialise(d, pods, namespaces, netsets)
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
	r.hostDispatch(rs, endpoints)
	return rs
}

// policyChainRef is a policy's chain in one direction: the policy's key,
// and whether it is the egress chain.
type policyChainRef struct {
	key    string
	egress bool
}

// materialise computes a set's entries over every pod.
func (r *Renderer) materialise(d *setDef, pods []*Pod, namespaces map[string]*Namespace, netsets []*NetworkSet) *Set {
	set := &Set{Name: d.name, Type: d.typ, IPv6: r.IPv6, Entries: slices.Clone(d.static)}
	for _, pod := range pods {
		set.Entries = append(set.Entries, r.podEntries(d, pod, namespaces[pod.Namespace])...)
	}
	for _, ns := range netsets {
		set.Entries = append(set.Entries, r.netSetEntries(d, ns, namespaces[ns.Namespace])...)
	}
	set.Entries = slices.Compact(slices.Sorted(slices.Values(set.Entries)))
	sortEntries(set)
	return set
}

// endpointChains renders an endpoint's chains of a direction: its chain
// and port tree (see porttree.go) for forwarded traffic, and in egress
// its chain for traffic to its own node (hosttraffic.go).
func (r *Renderer) endpointChains(veth string, self []netip.Addr, keys []string, policies map[string]*Policy, egress bool) map[string][]string {
	chains := r.forwardEndpointChains(veth, self, keys, policies, egress)
	if egress {
		if host := r.hostChain(veth, keys, policies); host != nil {
			chains[HostChain(veth)] = host
		}
	}
	return chains
}

// forwardEndpointChains renders the chain of a direction for forwarded
// traffic, with its port tree.
func (r *Renderer) forwardEndpointChains(veth string, self []netip.Addr, keys []string, policies map[string]*Policy, egress bool) map[string][]string {
	chain := EndpointChain(veth, egress)
	pols := policiesOf(policies, keys)
	rules := r.endpointRules(chain, pols, egress)
	if len(pols) == 0 {
		return map[string][]string{chain: rules}
	}
	// After conntrack, before any policy: the pod itself.
	head := append(slices.Clone(rules[:2]), r.selfRules(chain, self, egress)...)
	threshold := r.PortTreeThreshold
	if threshold == 0 {
		threshold = DefaultPortTreeThreshold
	}
	if len(pols) <= threshold || !portTreeFits(pols) {
		return map[string][]string{chain: append(head, rules[2:]...)}
	}
	head = append(head, fmt.Sprintf("-A %s -j MARK --set-xmark 0x0/0x%x", chain, r.AcceptMark|r.passMark()))
	t := &portTree{r: r, suffix: strings.TrimPrefix(veth, contract.HostVethPrefix), egress: egress, chains: map[string][]string{}, tier: pols[0].tier().Name}
	t.chains[chain] = append(head, t.render(chain, pols)...)
	return t.chains
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
