package policye2e

import (
	"context"
	"fmt"
	"net"
	"os/exec"
	"sort"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sluice-net/sluice/test/labtest"
)

// connectP50 measures TCP connection set-up from one pod to another: every
// new connection walks the policy chains.
func connectP50(b *testing.B, from, to string) time.Duration {
	client, _ := shared.Resolve(from)
	ip, _ := shared.ResolveTarget(to, false)
	var lat []time.Duration
	err := ns.WithNetNSPath(client.NetNSPath, func(ns.NetNS) error {
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

func iperf(b *testing.B, from, to string) float64 {
	server, _ := shared.Resolve(to)
	client, _ := shared.Resolve(from)
	ip, _ := shared.ResolveTarget(to, false)
	return labtest.Iperf(b, server, client, ip)
}

// BenchmarkPerPacketCost measures throughput and connect latency between
// two pods on different nodes with no policy, then with 1,000 policies
// selecting the server (one of them allowing the client), in the same run.
func BenchmarkPerPacketCost(b *testing.B) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("iperf3 is not installed")
	}
	ctx := context.Background()
	from, to := "x/a", "y/b" // node-1 -> node-2
	var base, loaded float64
	var baseConn, loadedConn time.Duration
	for i := 0; i < b.N; i++ {
		base += iperf(b, from, to)
		baseConn += connectP50(b, from, to)
	}
	tcp := corev1.ProtocolTCP
	for i := 0; i < 1000; i++ {
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "y", Name: fmt.Sprintf("bulk-%d", i)}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: *sel("pod", "b"),
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", fmt.Sprintf("team-%d", i))}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: ptrIntOrStr(intstr.FromInt32(int32(10000 + i)))}},
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
	// Wait until the node has all of them (the allowing one is last).
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if _, err := shared.Probe(from, to, 5201, false, false); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if _, err := shared.ProbeEventually(from, to, 80, false, false, time.Minute); err != nil {
		b.Fatalf("the client is not allowed after 1,000 policies: %v", err)
	}
	for i := 0; i < b.N; i++ {
		loaded += iperf(b, from, to)
		loadedConn += connectP50(b, from, to)
	}
	n := float64(b.N)
	b.ReportMetric(base/n, "none-Gbps")
	b.ReportMetric(loaded/n, "1000-policies-Gbps")
	b.ReportMetric(loaded/base, "throughput-ratio")
	b.ReportMetric(float64(baseConn.Microseconds())/n/1000, "none-connect-p50-ms")
	b.ReportMetric(float64(loadedConn.Microseconds())/n/1000, "1000-policies-connect-p50-ms")
}

func ptrIntOrStr(v intstr.IntOrString) *intstr.IntOrString { return &v }
