package policy

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	cnpv1beta1 "sigs.k8s.io/network-policy-api/apis/v1beta1"
	cnpfake "sigs.k8s.io/network-policy-api/pkg/client/clientset/versioned/fake"

	"github.com/sluice-net/sluice/internal/forward"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

// scaleCNPs are 100 ClusterNetworkPolicies over the scale cluster: half
// Admin, half Baseline, each selecting one app's pods in the namespaces
// of one team, with a Pass, a Deny and an Accept rule.
func scaleCNPs() []*cnpv1beta1.ClusterNetworkPolicy {
	var out []*cnpv1beta1.ClusterNetworkPolicy
	for i := 0; i < 100; i++ {
		tier := cnpv1beta1.AdminTier
		if i%2 == 1 {
			tier = cnpv1beta1.BaselineTier
		}
		port := &cnpv1beta1.Port{Number: int32(9000 + i)}
		o := &cnpv1beta1.ClusterNetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("cnp-%d", i), Generation: 1},
			Spec: cnpv1beta1.ClusterNetworkPolicySpec{Tier: tier, Priority: int32(i),
				Subject: cnpv1beta1.ClusterNetworkPolicySubject{Pods: &cnpv1beta1.NamespacedPod{
					NamespaceSelector: metav1.LabelSelector{MatchLabels: map[string]string{"team": fmt.Sprint(i % 5)}},
					PodSelector:       metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app%d", i%20)}}}},
				Ingress: []cnpv1beta1.ClusterNetworkPolicyIngressRule{
					{Action: cnpv1beta1.ClusterNetworkPolicyRuleActionPass, From: []cnpv1beta1.ClusterNetworkPolicyIngressPeer{{Namespaces: &metav1.LabelSelector{MatchLabels: map[string]string{"team": fmt.Sprint(i % 5)}}}}},
					{Action: cnpv1beta1.ClusterNetworkPolicyRuleActionDeny, From: []cnpv1beta1.ClusterNetworkPolicyIngressPeer{{Namespaces: &metav1.LabelSelector{}}},
						Protocols: []cnpv1beta1.ClusterNetworkPolicyProtocol{{TCP: &cnpv1beta1.ClusterNetworkPolicyProtocolTCP{DestinationPort: port}}}},
				},
				Egress: []cnpv1beta1.ClusterNetworkPolicyEgressRule{
					{Action: cnpv1beta1.ClusterNetworkPolicyRuleActionAccept, To: []cnpv1beta1.ClusterNetworkPolicyEgressPeer{{Networks: []cnpv1beta1.CIDR{cnpv1beta1.CIDR(fmt.Sprintf("192.0.2.%d/32", i))}}}},
				}}}
		out = append(out, o)
	}
	return out
}

// BenchmarkLoopClusterNetworkPolicyChange measures, at issue #5's scale
// (5,000 pods, 1,000 NetworkPolicies) with 100 ClusterNetworkPolicies
// beside them, the time from a ClusterNetworkPolicy written to the API (a
// fake clientset) to the loop having applied it to the kernel of a test
// namespace; and, on the same loop in alternating order, the same for a
// NetworkPolicy, the baseline.
func BenchmarkLoopClusterNetworkPolicyChange(b *testing.B) {
	quietKlog()
	cnpChange, npChange := startCNPScaleLoop(b)
	var cnpLat, npLat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if i%2 == 0 {
			cnpLat = append(cnpLat, cnpChange())
			npLat = append(npLat, npChange())
		} else {
			npLat = append(npLat, npChange())
			cnpLat = append(cnpLat, cnpChange())
		}
	}
	b.StopTimer()
	p50, p99 := percentiles(cnpLat)
	np50, np99 := percentiles(npLat)
	b.ReportMetric(p50, "cnp-written-to-applied-p50-ms")
	b.ReportMetric(p99, "cnp-written-to-applied-p99-ms")
	b.ReportMetric(np50, "np-written-to-applied-p50-ms")
	b.ReportMetric(np99, "np-written-to-applied-p99-ms")
}

// startCNPScaleLoop runs the scale loop with 100 ClusterNetworkPolicies
// and returns two changes: an Admin ClusterNetworkPolicy and a
// NetworkPolicy selecting the first local endpoint, each created, waited
// for, then deleted outside the timer.
func startCNPScaleLoop(b *testing.B) (cnpChange, npChange func() time.Duration) {
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
	var cnpObjs []runtime.Object
	for _, o := range scaleCNPs() {
		cnpObjs = append(cnpObjs, o)
	}
	client, cnpClient := fake.NewClientset(objs...), cnpfake.NewSimpleClientset(cnpObjs...)
	ctx, cancel := context.WithCancel(context.Background())
	n := nettest.NewNS(b)
	l := NewLoop(Config{NodeName: "node-1", IPv4: true, IPTablesMode: iptables.ModeNFT, ResyncPeriod: 5 * time.Second}, client, nil).
		WithClusterNetworkPolicies(cnpClient)
	l.Seed(locals)
	done := make(chan error, 1)
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
		case <-time.After(10 * time.Millisecond):
		}
	}
	b.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			b.Error(err)
		}
	})
	target := locals[0] // app0 in s0, team 0
	waitFor := func(key string, selected bool) {
		timeout := time.After(20 * time.Second)
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
			case err := <-done:
				b.Fatalf("loop stopped: %v", err)
			case <-timeout:
				b.Fatalf("%s never applied (selected=%v)", key, selected)
			}
		}
	}
	gate := &cnpv1beta1.ClusterNetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "gate", Generation: 1}, Spec: cnpv1beta1.ClusterNetworkPolicySpec{
		Tier: cnpv1beta1.AdminTier, Priority: 500,
		Subject: cnpv1beta1.ClusterNetworkPolicySubject{Pods: &cnpv1beta1.NamespacedPod{
			NamespaceSelector: metav1.LabelSelector{MatchLabels: map[string]string{"team": "0"}},
			PodSelector:       metav1.LabelSelector{MatchLabels: map[string]string{"app": "app0"}}}},
		Ingress: []cnpv1beta1.ClusterNetworkPolicyIngressRule{{Action: cnpv1beta1.ClusterNetworkPolicyRuleActionDeny,
			From: []cnpv1beta1.ClusterNetworkPolicyIngressPeer{{Pods: &cnpv1beta1.NamespacedPod{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"role": "prober"}}}}}}},
	}}
	npGate := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "s0", Name: "gate"}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "app0"}},
		Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "prober"}}}}}},
	}}
	cnpChange = func() time.Duration {
		start := time.Now()
		if _, err := cnpClient.PolicyV1beta1().ClusterNetworkPolicies().Create(ctx, gate, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		waitFor(ClusterNetworkPolicyKey+"gate", true)
		took := time.Since(start)
		b.StopTimer()
		if err := cnpClient.PolicyV1beta1().ClusterNetworkPolicies().Delete(ctx, "gate", metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		waitFor(ClusterNetworkPolicyKey+"gate", false)
		b.StartTimer()
		return took
	}
	npChange = func() time.Duration {
		start := time.Now()
		if _, err := client.NetworkingV1().NetworkPolicies("s0").Create(ctx, npGate, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		waitFor("s0/gate", true)
		took := time.Since(start)
		b.StopTimer()
		if err := client.NetworkingV1().NetworkPolicies("s0").Delete(ctx, "gate", metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		waitFor("s0/gate", false)
		b.StartTimer()
		return took
	}
	return cnpChange, npChange
}
