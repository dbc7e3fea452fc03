package policy

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	calicofake "github.com/projectcalico/api/pkg/client/clientset_generated/clientset/fake"
	"github.com/projectcalico/api/pkg/lib/numorstring"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/sluice-net/sluice/internal/forward"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

// calicoScaleObjects are issue #14's benchmark scale on top of
// scaleObjects' cluster (5,000 pods, 1,000 Kubernetes policies, 100 local
// endpoints): 500 Calico policies in 3 tiers, half namespaced, half
// global, with Allow, Deny and Pass rules.
func calicoScaleObjects() []runtime.Object {
	order := func(f float64) *float64 { return &f }
	pass := v3.Pass
	objs := []runtime.Object{
		&v3.Tier{ObjectMeta: metav1.ObjectMeta{Name: "security"}, Spec: v3.TierSpec{Order: order(100)}},
		&v3.Tier{ObjectMeta: metav1.ObjectMeta{Name: "platform"}, Spec: v3.TierSpec{Order: order(500), DefaultAction: &pass}},
	}
	tcp := numorstring.ProtocolFromString("TCP")
	for i := 0; i < 500; i++ {
		tier := []string{"security", "platform", "default"}[i%3]
		rules := []v3.Rule{
			{Action: v3.Allow, Protocol: &tcp, Source: v3.EntityRule{Selector: fmt.Sprintf("app == 'app%d'", (i+1)%20)},
				Destination: v3.EntityRule{Ports: []numorstring.Port{numorstring.SinglePort(uint16(8000 + i%100))}}},
			{Action: v3.Deny, Source: v3.EntityRule{Nets: []string{fmt.Sprintf("192.0.%d.0/24", i%250)}}},
		}
		if tier != "default" {
			rules = append(rules, v3.Rule{Action: v3.Pass})
		}
		sel := fmt.Sprintf("app == 'app%d'", i%20)
		if i%2 == 0 {
			objs = append(objs, &v3.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: fmt.Sprintf("s%d", i%10), Name: fmt.Sprintf("cnp-%d", i)},
				Spec: v3.NetworkPolicySpec{Tier: tier, Order: order(float64(i)), Selector: sel, Ingress: rules}})
		} else {
			objs = append(objs, &v3.GlobalNetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("gnp-%d", i)},
				Spec: v3.GlobalNetworkPolicySpec{Tier: tier, Order: order(float64(i)), Selector: sel, NamespaceSelector: fmt.Sprintf("team == '%d'", i%5), Ingress: rules}})
		}
	}
	return objs
}

// calicoScaleLoop runs a loop at that scale in a test namespace; it
// returns the loop, the clients, and how long the loop took from Run to
// fully programmed.
func calicoScaleLoop(b *testing.B, withCalico bool) (*Loop, *fake.Clientset, *calicofake.Clientset, time.Duration, func()) {
	pods, nss, pols, locals := scaleObjects()
	var objs []runtime.Object
	for _, o := range nss {
		objs = append(objs, o)
	}
	for _, o := range pods {
		objs = append(objs, o)
	}
	for _, o := range pols {
		objs = append(objs, o)
	}
	client := fake.NewClientset(objs...)
	client.Resources = []*metav1.APIResourceList{{GroupVersion: "projectcalico.org/v3", APIResources: []metav1.APIResource{{Name: "networkpolicies"}}}}
	var calicoObjs []runtime.Object
	if withCalico {
		calicoObjs = calicoScaleObjects()
	}
	calico := calicofake.NewSimpleClientset(calicoObjs...)
	ctx, cancel := context.WithCancel(context.Background())
	n := nettest.NewNS(b)
	l := NewLoop(Config{NodeName: "node-1", IPv4: true, IPTablesMode: iptables.ModeNFT, ResyncPeriod: 5 * time.Second}, client, nil).WithCalico(calico, nil)
	l.Seed(locals)
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		done <- n.Do(func(ns.NetNS) error {
			r, err := iptables.New(iptables.IPv4, iptables.ModeNFT)
			if err != nil {
				return err
			}
			if err := forward.Apply(r); err != nil {
				return err
			}
			return l.Run(ctx)
		})
	}()
	for !l.Ready() {
		select {
		case err := <-done:
			b.Fatalf("loop stopped: %v", err)
		case <-time.After(5 * time.Millisecond):
		}
	}
	took := time.Since(start)
	if want := map[bool]int{true: 1500, false: 1000}[withCalico]; len(l.state.policies) < want {
		b.Fatalf("programmed %d policies, want %d", len(l.state.policies), want)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				b.Error(err)
			}
		})
	}
	b.Cleanup(stop)
	return l, client, calico, took, stop
}

// BenchmarkCalicoPolicyChange measures, at issue #14's scale, the time
// from a policy written to the API (fake clientsets) to the loop having
// applied it to the kernel: a Calico GlobalNetworkPolicy in the security
// tier, and, as the baseline in the same loop and run, a Kubernetes
// NetworkPolicy, alternately. It also reports the time from Run to fully
// programmed (one loop per benchmark run) and the rules of one endpoint's
// chain.
func BenchmarkCalicoPolicyChange(b *testing.B) {
	quietKlog()
	// The start of a loop with the Kubernetes policies only is the
	// baseline of the start with the Calico ones too.
	_, _, _, k8sStartTook, stopBaseline := calicoScaleLoop(b, false)
	stopBaseline()
	l, client, calico, startTook, _ := calicoScaleLoop(b, true)
	var target LocalEndpoint
	for _, ep := range l.state.LocalEndpoints() {
		if ep.Pod.Name == "pod-0" { // app0 in s0
			target = ep
		}
	}
	ctx := context.Background()
	gnpKey := CalicoGlobalNetworkPolicyKey + "gate"
	wait := func(key string, selected bool) {
		deadline := time.After(20 * time.Second)
		for {
			l.mu.Lock()
			ch := l.appliedCh
			has := slices.Contains(l.status.EndpointPolicies[target.HostVeth], key)
			l.mu.Unlock()
			if has == selected {
				return
			}
			select {
			case <-ch:
			case <-deadline:
				b.Fatalf("%s never applied (selected=%v)", key, selected)
			}
		}
	}
	calicoChange := func() time.Duration {
		order := float64(1)
		gnp := &v3.GlobalNetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "gate"}, Spec: v3.GlobalNetworkPolicySpec{
			Tier: "security", Order: &order, Selector: "app == 'app0'", Ingress: []v3.Rule{{Action: v3.Deny, Source: v3.EntityRule{Selector: "role == 'prober'"}}}}}
		start := time.Now()
		if _, err := calico.ProjectcalicoV3().GlobalNetworkPolicies().Create(ctx, gnp, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		wait(gnpKey, true)
		took := time.Since(start)
		b.StopTimer()
		if err := calico.ProjectcalicoV3().GlobalNetworkPolicies().Delete(ctx, "gate", metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		wait(gnpKey, false)
		b.StartTimer()
		return took
	}
	k8sChange := func() time.Duration {
		gate := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "s0", Name: "gate"}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "app0"}},
			Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "prober"}}}}}},
		}}
		start := time.Now()
		if _, err := client.NetworkingV1().NetworkPolicies("s0").Create(ctx, gate, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		wait("s0/gate", true)
		took := time.Since(start)
		b.StopTimer()
		if err := client.NetworkingV1().NetworkPolicies("s0").Delete(ctx, "gate", metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		wait("s0/gate", false)
		b.StartTimer()
		return took
	}
	var calicoLat, k8sLat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if i%2 == 0 {
			calicoLat = append(calicoLat, calicoChange())
			k8sLat = append(k8sLat, k8sChange())
		} else {
			k8sLat = append(k8sLat, k8sChange())
			calicoLat = append(calicoLat, calicoChange())
		}
	}
	b.StopTimer()
	c50, c99 := percentiles(calicoLat)
	k50, k99 := percentiles(k8sLat)
	b.ReportMetric(c50, "calico-written-to-applied-p50-ms")
	b.ReportMetric(c99, "calico-written-to-applied-p99-ms")
	b.ReportMetric(k50, "k8s-written-to-applied-p50-ms")
	b.ReportMetric(k99, "k8s-written-to-applied-p99-ms")
	b.ReportMetric(float64(startTook.Milliseconds()), "start-to-programmed-ms")
	b.ReportMetric(float64(k8sStartTook.Milliseconds()), "k8s-only-start-to-programmed-ms")
	rs := l.state.families[0].endpointChains[target.HostVeth]
	b.ReportMetric(float64(len(rs.chains[EndpointChain(target.HostVeth, false)])), "target-ingress-rules")
}

// TestTieredRulesPerEndpointStayFlat: an endpoint's chain and the chains
// it jumps to do not grow with the number of pods, with tiered Calico
// policies selecting it.
func TestTieredRulesPerEndpointStayFlat(t *testing.T) {
	count := func(nPods int) int {
		w := newTierWorld()
		base := w.pods[0]
		for i := 0; i < nPods; i++ {
			p := *w.pods[i%len(w.pods)]
			p.Name = fmt.Sprintf("%s-%d", p.Name, i)
			p.IPs = []netip.Addr{netip.AddrFrom4([4]byte{10, 245, byte(i / 250), byte(i%250 + 1)})}
			w.pods = append(w.pods, &p)
		}
		g := newTierGen(7)
		var pols []*Policy
		for i := 0; i < 30; i++ {
			pols = append(pols, g.policy(i))
		}
		rs := w.render(pols, false)
		n := 0
		for _, r := range rs.Chains[EndpointChain(w.veth(base), false)] {
			n++
			if _, target, ok := cutTarget(r); ok && rs.Chains[target] != nil {
				n += len(rs.Chains[target])
			}
		}
		return n
	}
	if small, large := count(10), count(2000); small != large {
		t.Errorf("rules per endpoint: %d at 10 pods, %d at 2,000", small, large)
	}
}

// cutTarget returns a rule's jump target, if it jumps to a chain.
func cutTarget(rule string) (string, string, bool) {
	i := len(rule) - 1
	for i > 0 && rule[i] != ' ' {
		i--
	}
	target := rule[i+1:]
	if len(target) > 7 && target[:7] == "SLUICE-" {
		return rule[:i], target, true
	}
	return "", "", false
}

// BenchmarkCalicoRulesPerEndpoint renders the benchmark's cluster with
// 1,000 and with 5,000 pods and reports the rules one endpoint's packets
// can meet (its chain and the policy chains it jumps to), which must not
// grow with the pods.
func BenchmarkCalicoRulesPerEndpoint(b *testing.B) {
	podObjs, nsObjs, npObjs, _ := scaleObjects()
	tiers := map[string]*Tier{DefaultTierName: DefaultTier()}
	var calicoPols []*Policy
	for _, o := range calicoScaleObjects() {
		if t, ok := o.(*v3.Tier); ok {
			tier, _ := FromTier(t)
			tiers[t.Name] = tier
		}
	}
	lookup := func(n string) *Tier { return tiers[n] }
	for _, o := range calicoScaleObjects() {
		switch p := o.(type) {
		case *v3.NetworkPolicy:
			calicoPols = append(calicoPols, FromCalicoNetworkPolicy(p, lookup))
		case *v3.GlobalNetworkPolicy:
			calicoPols = append(calicoPols, FromCalicoGlobalNetworkPolicy(p, lookup))
		}
	}
	policies := map[string]*Policy{}
	for _, np := range npObjs {
		p := FromNetworkPolicy(np)
		policies[p.Key] = p
	}
	for _, p := range calicoPols {
		policies[p.Key] = p
	}
	nss := map[string]*Namespace{}
	for _, n := range nsObjs {
		nss[n.Name] = &Namespace{Name: n.Name, Labels: n.Labels}
	}
	l := NewLoop(Config{}, nil, nil)
	rules := func(nPods int) int {
		var pods []*Pod
		for _, o := range podObjs[:nPods] {
			pods = append(pods, l.modelPod(o))
		}
		in, out := Selecting(policies, pods[0], nss[pods[0].Namespace])
		ep := LocalEndpoint{Pod: pods[0], HostVeth: "sl" + shortHash("pod-0")[:11], Ingress: in, Egress: out}
		rs := (&Renderer{AcceptMark: 0x10000}).Render(policies, []LocalEndpoint{ep}, pods, nss)
		n := 0
		for _, chain := range []string{EndpointChain(ep.HostVeth, false), EndpointChain(ep.HostVeth, true)} {
			for _, r := range rs.Chains[chain] {
				n++
				if _, target, ok := cutTarget(r); ok && !strings.HasPrefix(target, "SLUICE-FW") {
					n += len(rs.Chains[target])
				}
			}
		}
		return n
	}
	var small, large int
	for i := 0; i < b.N; i++ {
		small, large = rules(1000), rules(5000)
	}
	if small != large {
		b.Errorf("rules per endpoint: %d at 1,000 pods, %d at 5,000", small, large)
	}
	b.ReportMetric(float64(small), "rules-at-1000-pods")
	b.ReportMetric(float64(large), "rules-at-5000-pods")
}
