// Package policyscale benchmarks the policy loop at cluster scale in a lab:
// 100 local endpoints on one node, 5,000 pods in the cluster (the remote
// ones are API objects only, bound to a node without a kubelet) and 1,000
// policies. It holds benchmarks only and starts its lab inside them, so
// `make test` does not pay for it.
package policyscale

import (
	"context"
	"fmt"
	"net"
	"os"
	"regexp"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// The cluster's size: issue #5's scale, unless a benchmark sets another
// (BenchmarkProgrammingAt50000Pods, in scale50k_test.go).
var (
	namespaces = 10
	localPods  = 100
	totalPods  = 5000
	policies   = 1000
)

func fastClient(b *testing.B, l *labtest.Lab) kubernetes.Interface {
	cfg, err := clientcmd.BuildConfigFromFlags("", l.AdminKubeconfig())
	if err != nil {
		b.Fatal(err)
	}
	cfg.QPS, cfg.Burst = 2000, 4000
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		b.Fatal(err)
	}
	return cs
}

// parallel runs fn for 0..n-1 on 32 workers and fails on the first error.
func parallel(b *testing.B, n int, fn func(i int) error) {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	sem := make(chan struct{}, 32)
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			if err := fn(i); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
}

func populate(b *testing.B, l *labtest.Lab) {
	ctx := context.Background()
	cs := fastClient(b, l)
	for i := 0; i < namespaces; i++ {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s%d", i), Labels: map[string]string{"team": fmt.Sprint(i % 5)}}}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		if err := l.EnsureNamespace(ctx, fmt.Sprintf("s%d", i)); err != nil {
			b.Fatal(err)
		}
	}
	// Remote pods: bound to a node with no kubelet, with IPs written into
	// their status as a kubelet would.
	if _, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "far-away"}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	parallel(b, totalPods-localPods, func(i int) error {
		p := labtest.PodSpec{Namespace: fmt.Sprintf("s%d", i%namespaces), Name: fmt.Sprintf("remote-%d", i), Node: "far-away",
			Labels: map[string]string{"app": fmt.Sprintf("app%d", i%20)}}
		pod, err := cs.CoreV1().Pods(p.Namespace).Create(ctx, p.Pod(), metav1.CreateOptions{})
		if err != nil {
			return err
		}
		ip := fmt.Sprintf("10.250.%d.%d", i/250, i%250+1)
		pod.Status.Phase = corev1.PodRunning
		pod.Status.PodIP, pod.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
		_, err = cs.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, pod, metav1.UpdateOptions{})
		return err
	})
	// Local pods on node-1, and the prober on node-2.
	parallel(b, localPods, func(i int) error {
		p := labtest.PodSpec{Namespace: fmt.Sprintf("s%d", i%namespaces), Name: fmt.Sprintf("local-%d", i), Node: "node-1",
			Labels: map[string]string{"app": fmt.Sprintf("app%d", i%20)}, Ports: []corev1.ContainerPort{{ContainerPort: 80}}}
		_, err := cs.CoreV1().Pods(p.Namespace).Create(ctx, p.Pod(), metav1.CreateOptions{})
		return err
	})
	for i := 0; i < localPods; i++ {
		if _, err := l.WaitRunning(ctx, fmt.Sprintf("s%d", i%namespaces), fmt.Sprintf("local-%d", i)); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := l.CreatePod(ctx, labtest.PodSpec{Namespace: "s0", Name: "prober", Node: "node-2", Labels: map[string]string{"role": "prober"}}); err != nil {
		b.Fatal(err)
	}
	tcp := corev1.ProtocolTCP
	parallel(b, policies, func(i int) error {
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: fmt.Sprintf("s%d", i%namespaces), Name: fmt.Sprintf("pol-%d", i)},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app%d", i%20)}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app%d", (i+1)%20)}}}, {NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"team": fmt.Sprint(i % 5)}}}},
					Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: ptr(intstr.FromInt32(int32(8000 + i%100)))}},
				}},
			}}
		_, err := cs.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{})
		return err
	})
}

func ptr[T any](v T) *T { return &v }

// reachable tries one TCP connect with a short timeout.
func reachable(netnsPath, addr string, timeout time.Duration) bool {
	ok := false
	_ = ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", addr, timeout)
		if err == nil {
			ok = true
			c.Close()
		}
		return nil
	})
	return ok
}

func BenchmarkProgrammingAtScale(b *testing.B) { programmingAtScale(b) }

func programmingAtScale(b *testing.B) {
	l, err := labtest.Start(lab.Options{Nodes: 2})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Stop()
	t0 := time.Now()
	populate(b, l)
	b.Logf("populated in %s", time.Since(t0).Round(time.Second))
	ctx := context.Background()
	cs := fastClient(b, l)

	// The target: local-0 (app0 in s0), which 50 policies already select
	// and none of which lets the prober in on port 80.
	target := "s0/local-0"
	prober, _ := l.Resolve("s0/prober")
	ip, _ := l.ResolveTarget(target, false)
	addr := net.JoinHostPort(ip, "80")
	deadline := time.Now().Add(5 * time.Minute)
	for reachable(prober.NetNSPath, addr, 200*time.Millisecond) {
		if time.Now().After(deadline) {
			b.Fatal("the prober still reaches the target after 1,000 policies")
		}
	}
	// The agent may still be programming the bulk of policies just
	// created: the first sample would measure that backlog, not one
	// change. Wait until its last applied state holds them all, and say
	// how long that took.
	caughtUp := waitPoliciesProgrammed(b, l, "node-1", policies, 5*time.Minute)
	b.Logf("node-1 programmed all %d policies %s after the last was created", policies, caughtUp.Round(10*time.Millisecond))
	b.ReportMetric(caughtUp.Seconds(), "bulk-create-catch-up-s")
	// (a) From a NetworkPolicy write to enforcement on node-1.
	gate := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "s0", Name: "gate"}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "app0"}},
		Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "prober"}}}}}},
	}}
	var lat []time.Duration
	b.ResetTimer()
	// At least 20 samples in one lab: run with -benchtime 1x.
	for i := 0; i < max(b.N, 20); i++ {
		start := time.Now()
		if _, err := cs.NetworkingV1().NetworkPolicies("s0").Create(ctx, gate, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		for !reachable(prober.NetNSPath, addr, 5*time.Millisecond) {
			if time.Since(start) > time.Minute {
				b.Fatal("the allow never took effect")
			}
			// Leave the 2 cores to the agent being measured.
			time.Sleep(2 * time.Millisecond)
		}
		lat = append(lat, time.Since(start))
		b.StopTimer()
		if err := cs.NetworkingV1().NetworkPolicies("s0").Delete(ctx, "gate", metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		for reachable(prober.NetNSPath, addr, 50*time.Millisecond) {
		}
		b.StartTimer()
	}
	b.StopTimer()
	b.Logf("write-to-enforced samples, in order: %v", lat)
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "write-to-enforced-p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "write-to-enforced-p99-ms")
	reportFootprint(b, l, "node-1") // scale50k_test.go

	if out, err := l.Exec("node-1", "sh", "-c", "wget -qO- http://127.0.0.1:9098/metrics 2>/dev/null || curl -s http://127.0.0.1:9098/metrics"); err == nil {
		for _, line := range regexp.MustCompile(`(?m)^sluice_apply_(duration_seconds_(sum|count)|errors_total)\{loop="policy"\}.*$`).FindAllString(out, -1) {
			b.Log(line)
		}
	}
	if data, err := os.ReadFile(l.AgentLogPath("node-1")); err == nil {
		for _, line := range regexp.MustCompile(`(?m)^E.*$`).FindAllString(string(data), 5) {
			b.Log(line)
		}
		lines := regexp.MustCompile(`(?m)^.*(slow policy sync|policy rules written).*$`).FindAllString(string(data), -1)
		if len(lines) > 30 {
			lines = lines[len(lines)-30:]
		}
		for _, line := range lines {
			b.Log(line)
		}
	}
	// (b) Agent start to fully programmed with this state.
	node, _ := l.Node("node-1")
	if err := os.WriteFile(node.AgentDisabledPath(), nil, 0o644); err != nil {
		b.Fatal(err)
	}
	if err := l.KillAgent("node-1"); err != nil {
		b.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	os.Remove(node.AgentDisabledPath())
	re := regexp.MustCompile(`"policy programmed".*sinceStartMs=(\d+)`)
	logPath := l.AgentLogPath("node-1")
	deadline = time.Now().Add(5 * time.Minute)
	for {
		data, _ := os.ReadFile(logPath)
		m := re.FindAllSubmatch(data, -1)
		if len(m) >= 2 { // the first run's line and the restart's
			ms, _ := strconv.Atoi(string(m[len(m)-1][1]))
			b.ReportMetric(float64(ms)/1000, "agent-start-to-programmed-s")
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("the restarted agent never reported programmed")
		}
		time.Sleep(200 * time.Millisecond)
	}
}
