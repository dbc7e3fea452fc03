package policye2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"sort"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sluice-net/sluice/internal/status"
	"github.com/sluice-net/sluice/test/labtest"
)

// BenchmarkConnectFlatCost: TCP connect p50 and throughput from x/a to y/b,
// which 1,000 policies select (the last allowing x), against y/c, which
// none selects, in interleaved pairs of the same run; the ratios are the
// medians of each pair's ratio, so the machine's load cancels out. The
// goal (issue 18): connect ratio <= 1.3, throughput ratio >= 0.97.
func BenchmarkConnectFlatCost(b *testing.B) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("iperf3 is not installed")
	}
	ctx := context.Background()
	from, selected, unselected := "x/a", "y/b", "y/c"
	tcp := corev1.ProtocolTCP
	for i := 0; i < 1000; i++ {
		port := intstr.FromInt32(int32(10000 + i))
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "y", Name: fmt.Sprintf("flat-%d", i)}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: *sel("pod", "b"),
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", fmt.Sprintf("team-%d", i))}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}},
			}},
		}}
		if i == 999 {
			np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "x")}}})
		}
		if _, err := shared.Client.NetworkingV1().NetworkPolicies("y").Create(ctx, np, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	defer shared.Client.NetworkingV1().NetworkPolicies("y").DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
	// All 1,000 are in place once y/b's agent reports them selecting it.
	if !labtest.Eventually(3*time.Minute, func() bool { return policiesSelecting(b, selected) == 1000 }) {
		b.Fatalf("y/b is selected by %d policies, want 1000", policiesSelecting(b, selected))
	}
	if _, err := shared.ProbeEventually(from, selected, 80, false, false, time.Minute); err != nil {
		b.Fatalf("x/a is not allowed to y/b after 1,000 policies: %v", err)
	}
	var connRatio, tputRatio, none, loaded, noneG, loadedG []float64
	for i := 0; i < b.N; i++ {
		c1, c0 := connectP50(b, from, selected), connectP50(b, from, unselected)
		g1, g0 := iperf(b, from, selected), iperf(b, from, unselected)
		connRatio, tputRatio = append(connRatio, float64(c1)/float64(c0)), append(tputRatio, g1/g0)
		loaded, none = append(loaded, ms(c1)), append(none, ms(c0))
		loadedG, noneG = append(loadedG, g1), append(noneG, g0)
	}
	b.Logf("connect p50 ms, 1,000 policies %v, none %v; Gb/s %v, %v", loaded, none, loadedG, noneG)
	b.ReportMetric(median(none), "none-connect-p50-ms")
	b.ReportMetric(median(loaded), "1000-policies-connect-p50-ms")
	b.ReportMetric(median(connRatio), "connect-ratio")
	b.ReportMetric(median(noneG), "none-Gbps")
	b.ReportMetric(median(loadedG), "1000-policies-Gbps")
	b.ReportMetric(median(tputRatio), "throughput-ratio")
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

// policiesSelecting is how many policies the pod's agent reports selecting
// it.
func policiesSelecting(b *testing.B, pod string) int {
	_, node, err := shared.FindPod(pod)
	if err != nil {
		b.Fatal(err)
	}
	bins, err := labtest.Binaries()
	if err != nil {
		b.Fatal(err)
	}
	out, err := labtest.Command(bins+"/sluicectl", "status", "--lab-dir", shared.Dir, "--node", node.Name, "-o", "json")
	if err != nil {
		return -1
	}
	var r status.Report
	if json.Unmarshal([]byte(out), &r) != nil {
		return -1
	}
	for _, e := range r.Endpoints {
		if e.Pod == pod {
			return len(e.Policies)
		}
	}
	return -1
}
