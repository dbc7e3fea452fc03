package cnpe2e

import (
	"context"
	"fmt"
	"net"
	"sort"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	cnpv1beta1 "sigs.k8s.io/network-policy-api/apis/v1beta1"
)

// connectP50 measures TCP connection set-up from one pod to another, 200
// times: every new connection walks the policy chains.
func connectP50(b *testing.B, from, to string) time.Duration {
	client, err := shared.Resolve(from)
	if err != nil {
		b.Fatal(err)
	}
	ip, err := shared.ResolveTarget(to, false)
	if err != nil {
		b.Fatal(err)
	}
	var lat []time.Duration
	err = ns.WithNetNSPath(client.NetNSPath, func(ns.NetNS) error {
		for i := 0; i < 200; i++ {
			t0 := time.Now()
			c, err := net.DialTimeout("tcp", net.JoinHostPort(ip, "80"), 2*time.Second)
			if err != nil {
				return err
			}
			lat = append(lat, time.Since(t0))
			c.Close()
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return lat[len(lat)/2]
}

// BenchmarkConnectWith50ClusterNetworkPolicies measures TCP connect
// latency from y/b to x/a (on another node) with no policy, then with 50
// ClusterNetworkPolicies selecting x/a (25 Admin, 25 Baseline, each with
// a Pass and a Deny rule the client does not match, so every one of them
// is walked), in the same run, alternating.
func BenchmarkConnectWith50ClusterNetworkPolicies(b *testing.B) {
	ctx := context.Background()
	var none, with []time.Duration
	for i := 0; i < b.N; i++ {
		none = append(none, connectP50(b, "y/b", "x/a"))
		names := create50(b, ctx)
		// Let both nodes program them.
		time.Sleep(3 * time.Second)
		with = append(with, connectP50(b, "y/b", "x/a"))
		for _, n := range names {
			_ = cnps.PolicyV1beta1().ClusterNetworkPolicies().Delete(ctx, n, metav1.DeleteOptions{})
		}
		time.Sleep(3 * time.Second)
	}
	b.ReportMetric(median(none), "connect-no-cnp-p50-us")
	b.ReportMetric(median(with), "connect-50-cnp-p50-us")
}

func median(d []time.Duration) float64 {
	sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
	return float64(d[len(d)/2].Microseconds())
}

func create50(b *testing.B, ctx context.Context) []string {
	var names []string
	for i := 0; i < 50; i++ {
		tier := cnpv1beta1.AdminTier
		if i%2 == 1 {
			tier = cnpv1beta1.BaselineTier
		}
		o := &cnpv1beta1.ClusterNetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("bench-%d", i)},
			Spec: cnpv1beta1.ClusterNetworkPolicySpec{Tier: tier, Priority: int32(i),
				Subject: cnpv1beta1.ClusterNetworkPolicySubject{Pods: &cnpv1beta1.NamespacedPod{
					NamespaceSelector: metav1.LabelSelector{MatchLabels: map[string]string{"ns": "x"}},
					PodSelector:       metav1.LabelSelector{MatchLabels: map[string]string{"pod": "a"}}}},
				Ingress: []cnpv1beta1.ClusterNetworkPolicyIngressRule{
					{Action: cnpv1beta1.ClusterNetworkPolicyRuleActionPass, From: []cnpv1beta1.ClusterNetworkPolicyIngressPeer{{Namespaces: &metav1.LabelSelector{MatchLabels: map[string]string{"bench": fmt.Sprint(i)}}}}},
					{Action: cnpv1beta1.ClusterNetworkPolicyRuleActionDeny, From: []cnpv1beta1.ClusterNetworkPolicyIngressPeer{{Namespaces: &metav1.LabelSelector{}}},
						Protocols: []cnpv1beta1.ClusterNetworkPolicyProtocol{{TCP: &cnpv1beta1.ClusterNetworkPolicyProtocolTCP{DestinationPort: &cnpv1beta1.Port{Number: int32(1000 + i)}}}}},
				}}}
		if _, err := cnps.PolicyV1beta1().ClusterNetworkPolicies().Create(ctx, o, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		names = append(names, o.Name)
	}
	return names
}
