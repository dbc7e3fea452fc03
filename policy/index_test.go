package policy

import (
	"fmt"
	"maps"
	"math/rand"
	"net/netip"
	"slices"
	"sort"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/sluice-net/sluice/cni/endpointapi"
)

// randomWorld drives clusterState and the reference renderer with the
// same random changes.
type randomWorld struct {
	rnd        *rand.Rand
	policies   map[string]*Policy
	pods       map[string]*Pod
	namespaces map[string]*Namespace
	endpoints  map[string]endpointapi.Endpoint
}

var (
	testNamespaces = []string{"x", "y", "z"}
	testApps       = []string{"a", "b", "c"}
)

func (w *randomWorld) pick(list []string) string { return list[w.rnd.Intn(len(list))] }

func (w *randomWorld) randomSelector() *metav1.LabelSelector {
	switch w.rnd.Intn(4) {
	case 0:
		return &metav1.LabelSelector{}
	case 1:
		return &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "app", Operator: metav1.LabelSelectorOpIn, Values: []string{w.pick(testApps), w.pick(testApps)}}}}
	}
	return sel("app", w.pick(testApps))
}

func (w *randomWorld) randomPolicy(ns, name string) *Policy {
	spec := networkingv1.NetworkPolicySpec{PodSelector: *w.randomSelector()}
	peers := func() []networkingv1.NetworkPolicyPeer {
		var out []networkingv1.NetworkPolicyPeer
		for i := w.rnd.Intn(3); i > 0; i-- {
			switch w.rnd.Intn(4) {
			case 0:
				out = append(out, networkingv1.NetworkPolicyPeer{PodSelector: w.randomSelector()})
			case 1:
				out = append(out, networkingv1.NetworkPolicyPeer{NamespaceSelector: sel("team", w.pick([]string{"red", "blue"}))})
			case 2:
				out = append(out, networkingv1.NetworkPolicyPeer{NamespaceSelector: sel("team", "red"), PodSelector: w.randomSelector()})
			default:
				cidr := []string{"10.244.0.0/16", "fd00:10:244::/56", "0.0.0.0/0"}[w.rnd.Intn(3)]
				b := &networkingv1.IPBlock{CIDR: cidr}
				if cidr == "10.244.0.0/16" {
					b.Except = []string{"10.244.1.0/24"}
				}
				out = append(out, networkingv1.NetworkPolicyPeer{IPBlock: b})
			}
		}
		return out
	}
	ports := func() []networkingv1.NetworkPolicyPort {
		var out []networkingv1.NetworkPolicyPort
		for i := w.rnd.Intn(3); i > 0; i-- {
			if w.rnd.Intn(2) == 0 {
				out = append(out, port(int32(80+w.rnd.Intn(2)), corev1.ProtocolTCP))
			} else {
				out = append(out, namedPort(w.pick([]string{"http", "dns"}), []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP}[w.rnd.Intn(2)]))
			}
		}
		return out
	}
	if w.rnd.Intn(3) > 0 {
		spec.Ingress = append(spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: peers(), Ports: ports()})
	}
	if w.rnd.Intn(2) == 0 {
		spec.PolicyTypes = []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}
		spec.Egress = append(spec.Egress, networkingv1.NetworkPolicyEgressRule{To: peers(), Ports: ports()})
		if w.rnd.Intn(2) == 0 {
			spec.PolicyTypes = append(spec.PolicyTypes, networkingv1.PolicyTypeIngress)
		}
	}
	if w.rnd.Intn(15) == 0 {
		spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "not-a-cidr"}}}}}
	}
	return np(ns, name, spec)
}

func (w *randomWorld) randomPod(ns, name string, n int) *Pod {
	p := &Pod{Namespace: ns, Name: name, Labels: labels.Set{"app": w.pick(testApps)}, NamedPorts: map[string]NamedPort{}}
	if w.rnd.Intn(4) > 0 {
		p.IPs = append(p.IPs, netip.AddrFrom4([4]byte{10, 244, byte(w.rnd.Intn(3)), byte(n)}))
	}
	if w.rnd.Intn(2) == 0 {
		p.IPs = append(p.IPs, netip.MustParseAddr(fmt.Sprintf("fd00:10:244::%x", n)))
	}
	if w.rnd.Intn(2) == 0 {
		p.NamedPorts["http"] = NamedPort{TCP, int32(8080 + w.rnd.Intn(2))}
	}
	if w.rnd.Intn(3) == 0 {
		p.NamedPorts["dns"] = NamedPort{UDP, 53}
	}
	return p
}

// mutate makes one random change to both the world and the state.
func (w *randomWorld) mutate(s *clusterState, step int) {
	switch w.rnd.Intn(7) {
	case 0, 1:
		ns, name := w.pick(testNamespaces), fmt.Sprintf("pol%d", w.rnd.Intn(6))
		key := ns + "/" + name
		if w.rnd.Intn(4) == 0 {
			delete(w.policies, key)
			s.SetPolicy(key, nil)
			return
		}
		p := w.randomPolicy(ns, name)
		w.policies[key] = p
		s.SetPolicy(key, p)
	case 2, 3:
		ns, name := w.pick(testNamespaces), fmt.Sprintf("pod%d", w.rnd.Intn(8))
		key := ns + "/" + name
		if w.rnd.Intn(5) == 0 {
			delete(w.pods, key)
			s.SetPod(key, nil)
			return
		}
		p := w.randomPod(ns, name, step%250+1)
		w.pods[key] = p
		s.SetPod(key, p)
	case 4:
		name := w.pick(testNamespaces)
		if w.rnd.Intn(5) == 0 {
			delete(w.namespaces, name)
			s.SetNamespace(name, nil)
			return
		}
		ns := &Namespace{Name: name, Labels: labels.Set{"team": w.pick([]string{"red", "blue", "green"})}}
		w.namespaces[name] = ns
		s.SetNamespace(name, ns)
	default:
		// Local endpoints, some for pods the API does not have (yet).
		ns, pod := w.pick(testNamespaces), fmt.Sprintf("pod%d", w.rnd.Intn(10))
		key := "c-" + ns + "-" + pod + "/eth0"
		if _, ok := w.endpoints[key]; ok && w.rnd.Intn(2) == 0 {
			delete(w.endpoints, key)
		} else {
			w.endpoints[key] = endpointapi.Endpoint{ContainerID: "c-" + ns + "-" + pod, IfName: "eth0", Namespace: ns, Pod: pod,
				HostVeth: vethOf(key), IPs: []string{fmt.Sprintf("10.244.9.%d", step%250+1)}}
		}
		s.SetEndpoints(maps.Clone(w.endpoints))
	}
}

// reference renders the world from scratch.
func (w *randomWorld) reference(r *Renderer) *Ruleset {
	pods := map[string]*Pod{}
	for k, p := range w.pods {
		pods[k] = p
	}
	epsByPod := map[string][]endpointapi.Endpoint{}
	for _, ep := range w.endpoints {
		epsByPod[ep.Namespace+"/"+ep.Pod] = append(epsByPod[ep.Namespace+"/"+ep.Pod], ep)
	}
	for k, eps := range epsByPod {
		sort.Slice(eps, func(i, j int) bool { return eps[i].HostVeth < eps[j].HostVeth })
		var p Pod
		if api := w.pods[k]; api != nil {
			p = *api
		} else {
			p = Pod{Namespace: eps[0].Namespace, Name: eps[0].Pod, Labels: labels.Set{}}
		}
		p.IPs = nil
		for _, ep := range eps {
			for _, ip := range ep.IPs {
				if a := netip.MustParseAddr(ip); !slices.Contains(p.IPs, a) {
					p.IPs = append(p.IPs, a)
				}
			}
		}
		pods[k] = &p
	}
	var locals []LocalEndpoint
	for _, ep := range w.endpoints {
		pod := pods[ep.Namespace+"/"+ep.Pod]
		in, out := Selecting(w.policies, pod, nil)
		locals = append(locals, LocalEndpoint{Pod: pod, HostVeth: ep.HostVeth, Ingress: in, Egress: out})
	}
	sort.Slice(locals, func(i, j int) bool { return locals[i].HostVeth < locals[j].HostVeth })
	var list []*Pod
	for _, p := range pods {
		list = append(list, p)
	}
	return r.Render(w.policies, locals, list, w.namespaces)
}

// TestIncrementalMatchesFullRender holds the loop's incremental state
// equal to a render from scratch through thousands of random policy, pod,
// namespace and endpoint changes, in both families.
func TestIncrementalMatchesFullRender(t *testing.T) {
	for seed := int64(1); seed <= 20; seed++ {
		w := &randomWorld{rnd: rand.New(rand.NewSource(seed)), policies: map[string]*Policy{}, pods: map[string]*Pod{},
			namespaces: map[string]*Namespace{}, endpoints: map[string]endpointapi.Endpoint{}}
		renderers := []*Renderer{{AcceptMark: 0x10000}, {IPv6: true, AcceptMark: 0x10000}}
		s := newClusterState(renderers)
		for step := 0; step < 300; step++ {
			// Several changes per commit, as a coalesced burst.
			for n := w.rnd.Intn(4) + 1; n > 0; n-- {
				w.mutate(s, step)
			}
			got := s.Commit()
			for i, r := range renderers {
				if diff := rulesetDiff(got[i], w.reference(r)); diff != "" {
					t.Fatalf("seed %d step %d ipv6=%v: incremental state differs from a full render: %s", seed, step, r.IPv6, diff)
				}
			}
		}
	}
}

func rulesetDiff(got, want *Ruleset) string {
	for name, rules := range want.Chains {
		if g, ok := got.Chains[name]; !ok {
			return "missing chain " + name
		} else if !slices.Equal(g, rules) {
			return fmt.Sprintf("chain %s:\n got %q\nwant %q", name, g, rules)
		}
	}
	for name := range got.Chains {
		if _, ok := want.Chains[name]; !ok {
			return "extra chain " + name
		}
	}
	for name, s := range want.Sets {
		g, ok := got.Sets[name]
		if !ok {
			return "missing set " + name
		}
		if g.Type != s.Type || g.IPv6 != s.IPv6 || !slices.Equal(g.Entries, s.Entries) {
			return fmt.Sprintf("set %s: got %+v want %+v", name, g, s)
		}
	}
	for name := range got.Sets {
		if _, ok := want.Sets[name]; !ok {
			return "extra set " + name
		}
	}
	return ""
}
