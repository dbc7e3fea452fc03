package servicee2e

import (
	"fmt"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// BenchmarkServicePerConnectionCost measures TCP connect latency and
// throughput from a pod to a ClusterIP whose backend is on another node,
// with no policy selecting the backend and with 1,000 policies selecting
// it (one of them allowing the client). The two are interleaved in one
// run: a label on the backend pod switches the policies' selection on and
// off between samples.
func BenchmarkServicePerConnectionCost(b *testing.B) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("iperf3 is not installed")
	}
	c := startCluster(b, lab.ProxyIPTables, lab.ProxyBackendNFT)
	ctx := ctxT(b, 10*time.Minute)
	iperfSvc := service("web-iperf", "web", corev1.ServiceTypeClusterIP, 0, "")
	iperfSvc.Spec.Ports = []corev1.ServicePort{{Port: 5299, TargetPort: intstr.FromInt32(5299)}}
	created, err := c.Client.CoreV1().Services(ns).Create(ctx, iperfSvc, metav1.CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	iperfTarget := created.Spec.ClusterIP
	c.createBulkPolicies(b, 1000)

	var none, loaded []float64
	var noneConn, loadedConn []time.Duration
	for i := 0; i < b.N; i++ {
		for _, selected := range []bool{false, true} {
			c.selectBackend(b, selected)
			gbps := c.iperf(b, iperfTarget)
			conn := c.connectP50(b, "svc/client", c.svc("web"))
			if selected {
				loaded, loadedConn = append(loaded, gbps), append(loadedConn, conn)
			} else {
				none, noneConn = append(none, gbps), append(noneConn, conn)
			}
		}
	}
	// The ratios are medians of each interleaved pair's ratio: the pairs
	// ran seconds apart, so the machine's load cancels out of each.
	var tput, connect []float64
	for i := range none {
		tput = append(tput, loaded[i]/none[i])
		connect = append(connect, float64(loadedConn[i])/float64(noneConn[i]))
	}
	b.ReportMetric(median(none), "none-Gbps")
	b.ReportMetric(median(loaded), "1000-policies-Gbps")
	b.ReportMetric(median(tput), "throughput-ratio")
	b.ReportMetric(ms(medianDur(noneConn)), "none-connect-p50-ms")
	b.ReportMetric(ms(medianDur(loadedConn)), "1000-policies-connect-p50-ms")
	b.ReportMetric(median(connect), "connect-ratio")
	b.ReportMetric(float64(c.lostConnects), "lost-connects")
}

// createBulkPolicies makes n policies that select app=web pods labelled
// bulk=on, each allowing a namespace that does not exist on a port of its
// own, and a last one allowing role=client.
func (c *cluster) createBulkPolicies(b *testing.B, n int) {
	ctx := ctxT(b, 5*time.Minute)
	tcp := corev1.ProtocolTCP
	selector := metav1.LabelSelector{MatchLabels: map[string]string{"app": "web", "bulk": "on"}}
	for i := 0; i < n; i++ {
		port := intstr.FromInt32(int32(10000 + i))
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("bulk-%d", i)}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: selector,
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{NamespaceSelector: labelSel("team", fmt.Sprint(i))}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}},
			}},
		}}
		if i == n-1 {
			np.Spec.Ingress = append(np.Spec.Ingress, networkingv1.NetworkPolicyIngressRule{From: []networkingv1.NetworkPolicyPeer{podPeer("role", "client")}})
		}
		if _, err := c.Client.NetworkingV1().NetworkPolicies(ns).Create(ctx, np, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}

// selectBackend labels web-1 so that the bulk policies select it or not,
// and waits until the node's chain for it shows the change.
func (c *cluster) selectBackend(b *testing.B, on bool) {
	ctx := ctxT(b, 2*time.Minute)
	value := map[bool]string{true: `"on"`, false: `"off"`}[on]
	patch := []byte(`{"metadata":{"labels":{"bulk":` + value + `}}}`)
	if _, err := c.Client.CoreV1().Pods(ns).Patch(ctx, "web-1", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		b.Fatal(err)
	}
	want := map[bool]int{true: 1000, false: 0}[on]
	if !labtest.Eventually(2*time.Minute, func() bool { return c.policyJumps(b, "node-1") == want }) {
		b.Fatalf("node-1 never programmed web-1 with %d policies", want)
	}
	if _, err := c.getEventually("svc/client", c.svc("web"), true, time.Minute); err != nil {
		b.Fatal(err)
	}
}

var policyJump = regexp.MustCompile(` -j (SLUICE-PI-[0-9a-f]+)`)

// policyJumps counts the ingress policy chains that a node's endpoint
// chains (or their port trees) jump to.
func (c *cluster) policyJumps(b *testing.B, node string) int {
	out, err := c.Exec(node, "iptables-nft-save", "-t", "filter")
	if err != nil {
		// iptables-nft-save fails when a set it prints goes away under it
		// ("Set with index N in kernel doesn't exist"): read again.
		b.Logf("reading node-1's rules: %v", strings.SplitN(err.Error(), "\n", 2)[0])
		return -1
	}
	targets := map[string]bool{}
	for _, m := range policyJump.FindAllStringSubmatch(out, -1) {
		targets[m[1]] = true
	}
	return len(targets)
}

// iperf runs iperf3 from the client pod to the web pod through a
// ClusterIP and returns Gb/s.
func (c *cluster) iperf(b *testing.B, target string) float64 {
	server, err := c.Resolve(ns + "/web-1")
	if err != nil {
		b.Fatal(err)
	}
	client, err := c.Resolve(ns + "/client")
	if err != nil {
		b.Fatal(err)
	}
	return labtest.Iperf(b, server, client, target)
}

// connectP50 is the median of 200 TCP connection set-ups.
func (c *cluster) connectP50(b *testing.B, from, target string) time.Duration {
	place, err := c.Resolve(from)
	if err != nil {
		b.Fatal(err)
	}
	var lat []time.Duration
	lost := 0
	for len(lat) < 200 {
		t0 := time.Now()
		conn, err := place.Dial("tcp", target, 2*time.Second)
		if err != nil {
			// On a loaded machine a SYN can be lost twice; a few such
			// connects are noise, many are a fault.
			if lost++; lost > 5 {
				b.Fatalf("%d connects lost: %v", lost, err)
			}
			continue
		}
		lat = append(lat, time.Since(t0))
		conn.Close()
	}
	c.lostConnects += lost
	return medianDur(lat)
}

// BenchmarkServicePolicyWriteToEnforcement measures, through a ClusterIP,
// the time from writing a NetworkPolicy that allows the client to the
// first connection it lets through, with a default deny in place.
func BenchmarkServicePolicyWriteToEnforcement(b *testing.B) {
	c := startCluster(b, lab.ProxyIPTables, lab.ProxyBackendNFT)
	deny := denyIngress("web")
	if _, err := c.Client.NetworkingV1().NetworkPolicies(ns).Create(ctxT(b, time.Minute), deny, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	if _, err := c.getEventually("svc/client", c.svc("web"), false, time.Minute); err != nil {
		b.Fatal(err)
	}
	place, err := c.Resolve("svc/client")
	if err != nil {
		b.Fatal(err)
	}
	answers := func() bool {
		conn, err := place.Dial("tcp", c.svc("web"), 20*time.Millisecond)
		if err == nil {
			conn.Close()
		}
		return err == nil
	}
	var lat []time.Duration
	for i := 0; i < b.N; i++ {
		for j := 0; j < 20; j++ {
			lat = append(lat, c.writeToEnforcement(b, answers))
		}
	}
	slices.Sort(lat)
	b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
	b.ReportMetric(ms(lat[len(lat)*99/100]), "p99-ms")
	b.ReportMetric(float64(len(lat)), "samples")
}

// writeToEnforcement creates the allowing policy, times until the client
// gets through, then deletes it and waits until the client is denied.
func (c *cluster) writeToEnforcement(b *testing.B, answers func() bool) time.Duration {
	ctx := ctxT(b, time.Minute)
	allow := ingressFrom("web-from-clients", "web", podPeer("role", "client"))
	t0 := time.Now()
	if _, err := c.Client.NetworkingV1().NetworkPolicies(ns).Create(ctx, allow, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	for !answers() {
		if time.Since(t0) > 30*time.Second {
			b.Fatal("the allowing policy never took effect")
		}
	}
	took := time.Since(t0)
	if err := c.Client.NetworkingV1().NetworkPolicies(ns).Delete(ctx, allow.Name, metav1.DeleteOptions{}); err != nil {
		b.Fatal(err)
	}
	if !labtest.Eventually(30*time.Second, func() bool { return !answers() }) {
		b.Fatal("the deny never came back")
	}
	return took
}

func median(v []float64) float64 {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func medianDur(v []time.Duration) time.Duration {
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
