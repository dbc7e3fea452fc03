package calicoe2e

import (
	"context"
	"fmt"
	"math/rand"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sluice-net/sluice/internal/calicotest"
	"github.com/sluice-net/sluice/policy"
)

// randomPolicy is a random NetworkPolicy over the lab's pods: a pod
// selector, and ingress rules from pods, namespaces or a pod's address, on
// numeric or named ports.
func randomPolicy(rnd *rand.Rand, name string, podIPs map[string]string) *networkingv1.NetworkPolicy {
	pick := func(s ...string) string { return s[rnd.Intn(len(s))] }
	sel := func(k, v string) *metav1.LabelSelector {
		if v == "" {
			return &metav1.LabelSelector{}
		}
		return &metav1.LabelSelector{MatchLabels: map[string]string{k: v}}
	}
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: name},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", pick("a", "b", ""))}}
	for n := rnd.Intn(3); n > 0; n-- {
		var r networkingv1.NetworkPolicyIngressRule
		switch rnd.Intn(4) {
		case 0:
			r.From = append(r.From, networkingv1.NetworkPolicyPeer{PodSelector: sel("role", pick("db", "web"))})
		case 1:
			r.From = append(r.From, networkingv1.NetworkPolicyPeer{NamespaceSelector: sel("team", pick("red", "blue"))})
		case 2:
			r.From = append(r.From, networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: podIPs[pick(pods...)] + "/32"}})
		}
		tcp := corev1.ProtocolTCP
		switch rnd.Intn(3) {
		case 0:
			port := intstr.FromInt32(int32(80 + rnd.Intn(2)))
			r.Ports = []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}}
		case 1:
			port := intstr.FromString("serve-81-tcp")
			r.Ports = []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}}
		}
		np.Spec.Ingress = append(np.Spec.Ingress, r)
	}
	return np
}

// TestKubernetesAndCalicoParityInTheLab: random Kubernetes policies and
// their hand-translated Calico equivalents give the same observed truth
// table, each also the evaluator's.
func TestKubernetesAndCalicoParityInTheLab(t *testing.T) {
	ctx := context.Background()
	m := readModel(t, ctx)
	ips := map[string]string{}
	for _, p := range pods {
		ips[p] = m.endpoints[p].IP.String()
	}
	rnd := rand.New(rand.NewSource(14))
	for i := 0; i < 4; i++ {
		np := randomPolicy(rnd, fmt.Sprintf("parity-%d", i), ips)
		var tables [2]map[probeKey]bool
		for j := range tables {
			t.Run(fmt.Sprintf("%d-%s", i, []string{"kubernetes", "calico"}[j]), func(t *testing.T) {
				if j == 0 {
					created, err := shared.Client.NetworkingV1().NetworkPolicies("x").Create(ctx, np, metav1.CreateOptions{})
					must(t, err)
					defer func() {
						_ = shared.Client.NetworkingV1().NetworkPolicies("x").Delete(ctx, created.Name, metav1.DeleteOptions{})
					}()
				} else {
					c := calicotest.FromKubernetes(np)
					_, err := calico.ProjectcalicoV3().NetworkPolicies("x").Create(ctx, c, metav1.CreateOptions{})
					must(t, err)
					defer func() { _ = calico.ProjectcalicoV3().NetworkPolicies("x").Delete(ctx, c.Name, metav1.DeleteOptions{}) }()
				}
				checkTable(t, np.Name, []int32{80, 81}, []policy.Protocol{policy.TCP}, false, nil)
				tables[j] = observe([]int32{80, 81}, []policy.Protocol{policy.TCP}, false)
			})
		}
		for k, v := range tables[0] {
			if tables[1][k] != v {
				t.Errorf("%s: %s -> %s %s/%d: Kubernetes %v, Calico %v", np.Name, k.from, k.to, k.proto, k.port, v, tables[1][k])
			}
		}
	}
}
