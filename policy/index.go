package policy

import (
	"maps"
	"net/netip"
	"slices"
	"sort"

	"k8s.io/apimachinery/pkg/labels"

	"github.com/sluice-net/sluice/cni/endpointapi"
)

// clusterState is the policy loop's model of the cluster and of what it
// renders from it, kept up to date change by change. Renderer.Render
// computes the same rulesets from scratch; clusterState only redoes the
// part a change touches: a policy edit re-renders that policy's chains and
// re-checks it against the local endpoints; a pod edit re-checks that pod
// against each set. At 5,000 pods and 1,000 policies a full render costs
// tens of milliseconds, which is what the programming-latency goal cannot
// afford on every event.
//
// Use: record changes with SetPolicy, SetPod, SetNamespace and
// SetEndpoints, then call Commit for the rulesets. It is not safe for
// concurrent use.
type clusterState struct {
	policies   map[string]*Policy
	namespaces map[string]*Namespace
	netsets    map[string]*NetworkSet
	apiPods    map[string]*Pod // "namespace/name" -> as the API server has it
	endpoints  map[string]endpointapi.Endpoint
	// pods are the effective pods: the API's, with the registry's IPs for
	// pods that have local endpoints, plus placeholders for local
	// endpoints the API cache does not have yet (their labels are
	// unknown, but namespace-wide policies already apply to them).
	pods map[string]*Pod
	// podsByNamespace indexes pods by namespace: most sets only hold pods
	// of one namespace, and indexing a new set should not look at all.
	podsByNamespace map[string]map[string]*Pod
	selections      map[string]*selection // by endpoint key
	// versions numbers selections, never reusing a number, so a cached
	// endpoint chain is never mistaken for a newer one.
	versions int
	// locals are the local endpoints as of the last Commit.
	locals   []LocalEndpoint
	families []*familyState

	// Changes since the last Commit.
	dirtyPolicies   map[string]bool
	dirtyPods       map[string]bool
	dirtyNamespaces map[string]bool
	dirtyNetSets    map[string]bool
}

// selection is a local endpoint and the policies selecting it.
type selection struct {
	ep              endpointapi.Endpoint
	pod             *Pod
	ingress, egress []string
	// rendered endpoint chains are valid while these are unchanged.
	version int
}

// familyState is what clusterState renders for one IP family.
type familyState struct {
	r              *Renderer
	policyChains   map[policyChainRef]*renderedPolicy
	sets           map[string]*indexedSet
	endpointChains map[string]*renderedEndpoint // by host veth
}

type renderedPolicy struct {
	policy *Policy // rendered from this version
	chain  string  // PolicyChain, a hash kept rather than made on every sync
	rules  []string
	defs   []*setDef
}

type renderedEndpoint struct {
	version int
	// tiers is tierSignature of the policies it was rendered from: a
	// tier's default action is part of the chain.
	tiers string
	// chains are the endpoint's chains of both directions, with their
	// port trees.
	chains map[string][]string
}

// indexedSet is a set and each pod's contribution to it.
type indexedSet struct {
	def   *setDef
	byPod map[string][]string
	set   *Set // nil when byPod changed since it was built
}

func newClusterState(families []*Renderer) *clusterState {
	s := &clusterState{
		policies: map[string]*Policy{}, namespaces: map[string]*Namespace{}, netsets: map[string]*NetworkSet{}, apiPods: map[string]*Pod{},
		endpoints: map[string]endpointapi.Endpoint{}, pods: map[string]*Pod{}, podsByNamespace: map[string]map[string]*Pod{},
		selections:    map[string]*selection{},
		dirtyPolicies: map[string]bool{}, dirtyPods: map[string]bool{}, dirtyNamespaces: map[string]bool{}, dirtyNetSets: map[string]bool{},
	}
	for _, r := range families {
		s.families = append(s.families, &familyState{r: r, policyChains: map[policyChainRef]*renderedPolicy{},
			sets: map[string]*indexedSet{}, endpointChains: map[string]*renderedEndpoint{}})
	}
	return s
}

// SetPolicy records a policy, or its deletion with nil. A policy is
// treated as changed when the pointer differs, so callers keep the same
// pointer for an unchanged policy; the same goes for pods and namespaces.
func (s *clusterState) SetPolicy(key string, p *Policy) {
	setModel(s.policies, s.dirtyPolicies, key, p)
}

// SetPod records a pod ("namespace/name"), or its deletion with nil.
func (s *clusterState) SetPod(key string, p *Pod) { setModel(s.apiPods, s.dirtyPods, key, p) }

// SetNamespace records a namespace, or its deletion with nil.
func (s *clusterState) SetNamespace(name string, ns *Namespace) {
	setModel(s.namespaces, s.dirtyNamespaces, name, ns)
}

func setModel[T any](models map[string]*T, dirty map[string]bool, key string, v *T) {
	if models[key] == v {
		return
	}
	if v == nil {
		delete(models, key)
	} else {
		models[key] = v
	}
	dirty[key] = true
}

// SetNetworkSet records a network set, or its deletion with nil.
func (s *clusterState) SetNetworkSet(key string, ns *NetworkSet) {
	setModel(s.netsets, s.dirtyNetSets, key, ns)
}

// SetEndpoints replaces the local endpoints with the registry's.
func (s *clusterState) SetEndpoints(eps map[string]endpointapi.Endpoint) {
	for k, old := range s.endpoints {
		if cur, ok := eps[k]; !ok || !sameEndpoint(old, cur) {
			delete(s.endpoints, k)
			s.dirtyPods[old.Namespace+"/"+old.Pod] = true
		}
	}
	for k, ep := range eps {
		if _, ok := s.endpoints[k]; !ok {
			s.endpoints[k] = ep
			s.dirtyPods[ep.Namespace+"/"+ep.Pod] = true
		}
	}
}

func sameEndpoint(a, b endpointapi.Endpoint) bool {
	return a.Namespace == b.Namespace && a.Pod == b.Pod && a.HostVeth == b.HostVeth && slices.Equal(a.IPs, b.IPs)
}

// effectivePod is the pod as the rules see it.
func (s *clusterState) effectivePod(key string, eps []endpointapi.Endpoint) *Pod {
	api := s.apiPods[key]
	if len(eps) == 0 {
		return api
	}
	var p Pod
	if api != nil {
		p = *api
	} else {
		p = Pod{Namespace: eps[0].Namespace, Name: eps[0].Pod, Labels: labels.Set{}}
	}
	// The registry knows a local pod's IPs before the API server does.
	p.IPs = nil
	for _, ep := range eps {
		for _, ip := range ep.IPs {
			if a, err := netip.ParseAddr(ip); err == nil && !slices.Contains(p.IPs, a) {
				p.IPs = append(p.IPs, a)
			}
		}
	}
	return &p
}

// podChange is one effective pod before and after a commit.
type podChange struct {
	key      string
	old, new *Pod
}

// Commit brings everything derived up to date and returns the rulesets,
// one per family in the order given to newClusterState.
func (s *clusterState) Commit() []*Ruleset {
	// Effective pods.
	var changes []podChange
	if len(s.dirtyPods) > 0 {
		epsByPod := map[string][]endpointapi.Endpoint{}
		for _, ep := range s.endpoints {
			k := ep.Namespace + "/" + ep.Pod
			if s.dirtyPods[k] {
				epsByPod[k] = append(epsByPod[k], ep)
			}
		}
		for k := range s.dirtyPods {
			eps := epsByPod[k]
			sort.Slice(eps, func(i, j int) bool { return eps[i].HostVeth < eps[j].HostVeth })
			old, cur := s.pods[k], s.effectivePod(k, eps)
			if old != nil {
				delete(s.podsByNamespace[old.Namespace], k)
				if len(s.podsByNamespace[old.Namespace]) == 0 {
					delete(s.podsByNamespace, old.Namespace)
				}
			}
			if cur == nil {
				delete(s.pods, k)
			} else {
				s.pods[k] = cur
				if s.podsByNamespace[cur.Namespace] == nil {
					s.podsByNamespace[cur.Namespace] = map[string]*Pod{}
				}
				s.podsByNamespace[cur.Namespace][k] = cur
			}
			if old != cur {
				changes = append(changes, podChange{k, old, cur})
			}
		}
	}
	s.updateSelections()
	s.locals = s.localEndpoints()
	hint := 0
	if len(s.families) > 0 {
		hint = len(s.families[0].policyChains)
	}
	used := make(map[policyChainRef]bool, hint)
	for _, ep := range s.locals {
		for _, k := range ep.Ingress {
			used[policyChainRef{k, false}] = true
		}
		for _, k := range ep.Egress {
			used[policyChainRef{k, true}] = true
		}
	}
	rulesets := make([]*Ruleset, 0, len(s.families))
	for _, f := range s.families {
		rulesets = append(rulesets, s.renderFamily(f, changes, used, s.locals))
	}
	clear(s.dirtyPolicies)
	clear(s.dirtyPods)
	clear(s.dirtyNamespaces)
	clear(s.dirtyNetSets)
	return rulesets
}

// updateSelections finds the policies selecting each local endpoint: all
// of them for a new endpoint, a changed pod or a changed namespace (which
// cluster-wide policies select by), only the changed policies for the
// rest.
func (s *clusterState) updateSelections() {
	for k, sel := range s.selections {
		if ep, ok := s.endpoints[k]; !ok || !sameEndpoint(ep, sel.ep) {
			delete(s.selections, k)
		}
	}
	for k, ep := range s.endpoints {
		pod := s.pods[ep.Namespace+"/"+ep.Pod]
		ns := s.namespaces[ep.Namespace]
		sel, ok := s.selections[k]
		if !ok || sel.pod != pod || s.dirtyNamespaces[ep.Namespace] {
			in, out := Selecting(s.policies, pod, ns)
			if ok && slices.Equal(in, sel.ingress) && slices.Equal(out, sel.egress) {
				sel.pod = pod
				continue
			}
			s.versions++
			s.selections[k] = &selection{ep: ep, pod: pod, ingress: in, egress: out, version: s.versions}
			continue
		}
		if len(s.dirtyPolicies) == 0 {
			continue
		}
		var addIn, addOut []string
		for key := range s.dirtyPolicies {
			p := s.policies[key]
			if p != nil && !p.Staged && p.Selects(pod, ns) {
				if p.Ingress {
					addIn = append(addIn, key)
				}
				if p.Egress {
					addOut = append(addOut, key)
				}
			}
		}
		in, out := s.reorder(sel.ingress, addIn), s.reorder(sel.egress, addOut)
		if !slices.Equal(in, sel.ingress) || !slices.Equal(out, sel.egress) || s.dirtyPortTree(in, out) {
			sel.ingress, sel.egress = in, out
			s.versions++
			sel.version = s.versions
		}
	}
}

// reorder returns an endpoint's policy list after the changed policies:
// without the dirty ones, then with those of add put where they now
// belong (a changed policy may have a new order or tier). It returns list
// itself when nothing changed.
func (s *clusterState) reorder(list, add []string) []string {
	var out []string
	for _, k := range list {
		if !s.dirtyPolicies[k] {
			out = append(out, k)
		}
	}
	for _, k := range add {
		p := s.policies[k]
		i := 0
		for i < len(out) && comparePolicies(s.policies[out[i]], p) < 0 {
			i++
		}
		out = slices.Insert(out, i, k)
	}
	if slices.Equal(out, list) {
		return list
	}
	return out
}

// renderFamily brings one family's chains and sets up to date. used are
// the policy chains some local endpoint jumps to, and locals the endpoints
// ordered by host veth; both are the same for every family.
func (s *clusterState) renderFamily(f *familyState, changes []podChange, used map[policyChainRef]bool, locals []LocalEndpoint) *Ruleset {
	// Sized up front: at 10,000 policies growing them was a tenth of a
	// commit.
	rs := &Ruleset{Chains: make(map[string][]string, len(used)+8*len(f.endpointChains)+8), Sets: make(map[string]*Set, len(f.sets))}
	needed := s.renderPolicyChains(f, used, rs)
	s.renderSets(f, changes, needed, rs)
	s.renderEndpointChains(f, rs)
	f.r.dispatch(rs, locals, true)
	f.r.dispatch(rs, locals, false)
	f.r.hostDispatch(rs, locals)
	return rs
}

// renderPolicyChains puts into rs the chains of the policies some endpoint
// uses, rendered again only when the policy changed, and returns the sets
// they need.
func (s *clusterState) renderPolicyChains(f *familyState, used map[policyChainRef]bool, rs *Ruleset) map[string]*setDef {
	for u := range f.policyChains {
		if !used[u] {
			delete(f.policyChains, u)
		}
	}
	needed := make(map[string]*setDef, len(f.sets))
	for u := range used {
		p := s.policies[u.key]
		rp := f.policyChains[u]
		if rp == nil || rp.policy != p {
			rules, defs := f.r.policyRules(p, u.egress)
			rp = &renderedPolicy{policy: p, chain: PolicyChain(u.key, u.egress), rules: rules, defs: defs}
			f.policyChains[u] = rp
		}
		rs.Chains[rp.chain] = rp.rules
		for _, d := range rp.defs {
			if _, ok := needed[d.name]; !ok {
				needed[d.name] = d
			}
		}
	}
	return needed
}

// renderSets puts into rs the needed sets: it drops the unneeded, updates
// the rest for changed pods and namespaces, and indexes the new over
// every pod.
func (s *clusterState) renderSets(f *familyState, changes []podChange, needed map[string]*setDef, rs *Ruleset) {
	for name := range f.sets {
		if needed[name] == nil {
			delete(f.sets, name)
		}
	}
	for _, is := range f.sets {
		if is.def.peer == nil && is.def.namedPort == "" {
			continue // an ipBlock: no pod contributes
		}
		for _, c := range changes {
			s.reindex(f, is, c.key, c.new)
		}
		// Namespace labels decide peers with a namespace selector, and the
		// pods a cluster-wide policy's named-port set counts.
		nsScoped := is.def.peer != nil && is.def.peer.Namespaces != nil ||
			is.def.selectedBy != nil && is.def.selectedBy.NamespaceSelector != nil
		if nsScoped {
			for ns := range s.dirtyNamespaces {
				for k, pod := range s.podsByNamespace[ns] {
					s.reindex(f, is, k, pod)
				}
			}
		}
		if is.def.peer != nil && is.def.peer.NetworkSets {
			for k := range s.dirtyNetSets {
				s.reindexNetSet(f, is, k)
			}
			if nsScoped {
				for k, ns := range s.netsets {
					if s.dirtyNamespaces[ns.Namespace] {
						s.reindexNetSet(f, is, k)
					}
				}
			}
		}
	}
	for name, d := range needed {
		if _, ok := f.sets[name]; ok {
			continue
		}
		is := &indexedSet{def: d, byPod: map[string][]string{}}
		s.candidates(d, func(k string, pod *Pod) {
			if e := f.r.podEntries(d, pod, s.namespaces[pod.Namespace]); len(e) > 0 {
				is.byPod[k] = e
			}
		})
		if d.peer != nil && d.peer.NetworkSets {
			for k := range s.netsets {
				s.reindexNetSet(f, is, k)
			}
		}
		f.sets[name] = is
	}
	for name, is := range f.sets {
		if is.set == nil {
			is.set = &Set{Name: name, Type: is.def.typ, IPv6: f.r.IPv6, Entries: slices.Clone(is.def.static)}
			for _, e := range is.byPod {
				is.set.Entries = append(is.set.Entries, e...)
			}
			sortEntries(is.set)
			// A pod's address may also lie in a network set, and two
			// network sets may hold the same net.
			is.set.Entries = slices.Compact(is.set.Entries)
		}
		rs.Sets[name] = is.set
	}
}

// renderEndpointChains puts into rs the local endpoints' chains, rendered
// again only when their policies change.
func (s *clusterState) renderEndpointChains(f *familyState, rs *Ruleset) {
	local := make(map[string]bool, len(s.selections))
	for _, sel := range s.selections {
		local[sel.ep.HostVeth] = true
	}
	for veth := range f.endpointChains {
		if !local[veth] {
			delete(f.endpointChains, veth)
		}
	}
	for _, sel := range s.selections {
		veth := sel.ep.HostVeth
		re := f.endpointChains[veth]
		tiers := tierSignature(policiesOf(s.policies, sel.ingress)) + "|" + tierSignature(policiesOf(s.policies, sel.egress))
		if re == nil || re.version != sel.version || re.tiers != tiers {
			addrs := endpointAddrs(sel.ep)
			re = &renderedEndpoint{version: sel.version, tiers: tiers, chains: f.r.endpointChains(veth, addrs, sel.ingress, s.policies, false)}
			maps.Copy(re.chains, f.r.endpointChains(veth, addrs, sel.egress, s.policies, true))
			f.endpointChains[veth] = re
		}
		maps.Copy(rs.Chains, re.chains)
	}
}

// tierSignature is what an endpoint chain takes from its policies' tiers:
// where each tier begins and its default action.
func tierSignature(ps []*Policy) string {
	var b []byte
	for _, p := range ps {
		t := p.tier()
		b = append(b, t.Name...)
		b = append(b, '/')
		b = append(b, t.DefaultAction...)
		b = append(b, ';')
	}
	return string(b)
}

// reindexNetSet updates one network set's contribution to a set.
func (s *clusterState) reindexNetSet(f *familyState, is *indexedSet, key string) {
	var entries []string
	if ns := s.netsets[key]; ns != nil {
		entries = f.r.netSetEntries(is.def, ns, s.namespaces[ns.Namespace])
	}
	slot := netSetSlot + key
	if slices.Equal(entries, is.byPod[slot]) {
		return
	}
	if len(entries) == 0 {
		delete(is.byPod, slot)
	} else {
		is.byPod[slot] = entries
	}
	is.set = nil
}

// netSetSlot prefixes a network set's key in an indexedSet's byPod, which
// pod keys ("namespace/name") never start with.
const netSetSlot = "netset:"

// candidates calls fn for every pod that may contribute to a set: those
// of the one namespace the set is confined to, if it is.
func (s *clusterState) candidates(d *setDef, fn func(string, *Pod)) {
	namespace := ""
	switch {
	case d.peer != nil:
		namespace = d.peer.namespaceScoped()
	case d.selectedBy != nil:
		namespace = d.selectedBy.Namespace
	}
	if namespace != "" {
		for k, pod := range s.podsByNamespace[namespace] {
			fn(k, pod)
		}
		return
	}
	for k, pod := range s.pods {
		fn(k, pod)
	}
}

// reindex updates one pod's contribution to a set.
func (s *clusterState) reindex(f *familyState, is *indexedSet, key string, pod *Pod) {
	var entries []string
	if pod != nil {
		entries = f.r.podEntries(is.def, pod, s.namespaces[pod.Namespace])
	}
	if slices.Equal(entries, is.byPod[key]) {
		return
	}
	if len(entries) == 0 {
		delete(is.byPod, key)
	} else {
		is.byPod[key] = entries
	}
	is.set = nil
}

// LocalEndpoints returns the local endpoints with their policies, ordered
// by host veth, as of the last Commit. Callers must not change it.
func (s *clusterState) LocalEndpoints() []LocalEndpoint { return s.locals }

// localEndpoints lists the selections, ordered by host veth.
func (s *clusterState) localEndpoints() []LocalEndpoint {
	out := make([]LocalEndpoint, 0, len(s.selections))
	for _, sel := range s.selections {
		out = append(out, LocalEndpoint{Pod: sel.pod, HostVeth: sel.ep.HostVeth, IPs: endpointAddrs(sel.ep), Ingress: sel.ingress, Egress: sel.egress})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].HostVeth < out[j].HostVeth })
	return out
}

// Snapshot copies the model for work outside the loop (cutting denied
// flows); the policies and pods themselves are never changed in place.
func (s *clusterState) Snapshot() (map[string]*Policy, []*Pod, map[string]*Namespace, []LocalEndpoint) {
	pods := make([]*Pod, 0, len(s.pods))
	for _, p := range s.pods {
		pods = append(pods, p)
	}
	return maps.Clone(s.policies), pods, maps.Clone(s.namespaces), s.LocalEndpoints()
}

// endpointAddrs are the addresses the CNI plugin gave an endpoint (with or
// without a prefix length); they never change while it exists.
func endpointAddrs(ep endpointapi.Endpoint) []netip.Addr {
	var out []netip.Addr
	for _, s := range ep.IPs {
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Addr())
		} else if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// dirtyPortTree reports whether a changed policy selects the endpoint: its
// ports may be part of the endpoint's port tree, so the endpoint's chains
// are rendered again (the dataplane writes only what changed).
func (s *clusterState) dirtyPortTree(in, out []string) bool {
	for _, list := range [][]string{in, out} {
		for _, k := range list {
			if s.dirtyPolicies[k] {
				return true
			}
		}
	}
	return false
}

// NetworkSets lists the network sets, for work outside the loop.
func (s *clusterState) NetworkSets() []*NetworkSet {
	out := make([]*NetworkSet, 0, len(s.netsets))
	for _, n := range s.netsets {
		out = append(out, n)
	}
	return out
}
