package apicost

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

const (
	netConf   = `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`
	proxyPort = "16443"
	namespace = "apicost"
	// The cluster the agents watch, besides the lab's own objects.
	pods, policies = 500, 50
)

// restPeriod is how long the agents are watched at rest: a minute, unless
// SLUICE_APICOST_REST says otherwise.
func restPeriod(b *testing.B) time.Duration {
	if v := os.Getenv("SLUICE_APICOST_REST"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			b.Fatal(err)
		}
		return d
	}
	return time.Minute
}

// BenchmarkAgentAPIBytes: the bytes one agent receives from the API server
// (on the wire, TLS included, averaged over the lab's two agents) to
// start, per minute at rest, per Pod label change, and to recover after
// every connection drops, with protobuf (the default) and with JSON.
func BenchmarkAgentAPIBytes(b *testing.B) {
	l, err := labtest.Start(lab.Options{Nodes: 2, CNI: lab.CNIReference})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	podBytes := populate(b, ctx, l)
	b.Logf("%d pods (%d bytes of JSON each) and %d policies", pods, podBytes, policies)
	// The scheduler writes each new pod's Unschedulable condition once;
	// let that settle before anything is counted.
	time.Sleep(30 * time.Second)
	for _, ct := range []string{"application/vnd.kubernetes.protobuf", "application/json"} {
		b.Run(strings.TrimPrefix(ct, "application/"), func(b *testing.B) { measure(b, ctx, l, ct) })
	}
}

func populate(b *testing.B, ctx context.Context, l *labtest.Lab) int {
	if err := l.EnsureNamespace(ctx, namespace); err != nil {
		b.Fatal(err)
	}
	cs, err := l.FastClient()
	if err != nil {
		b.Fatal(err)
	}
	var size int
	for i := 0; i < pods; i++ {
		p := (labtest.PodSpec{Namespace: namespace, Name: fmt.Sprintf("p-%d", i),
			Labels: map[string]string{"app": fmt.Sprintf("app-%d", i%policies), "tier": "web", "gen": "0"},
			Ports:  []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}).Pod()
		// Pending for good, so that no kubelet runs them and neither the
		// pod garbage collector (pods of missing nodes) nor taint eviction
		// deletes them while the bytes are counted.
		p.Spec.NodeSelector = map[string]string{"apicost": "nowhere"}
		got, err := cs.CoreV1().Pods(namespace).Create(ctx, p, metav1.CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if i == 0 {
			raw, _ := json.Marshal(got)
			size = len(raw)
		}
	}
	for i := 0; i < policies; i++ {
		np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: fmt.Sprintf("np-%d", i)},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", i)}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
					PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"tier": "web"}}}}}},
			}}
		if _, err := cs.NetworkingV1().NetworkPolicies(namespace).Create(ctx, np, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	return size
}

func measure(b *testing.B, ctx context.Context, l *labtest.Lab, contentType string) {
	var proxies []*countingProxy
	upstream := net.JoinHostPort(l.ControlIP4, "6443")
	for _, n := range l.Nodes {
		p, err := newCountingProxy("/run/netns/"+n.NetNS, proxyPort, upstream)
		if err != nil {
			b.Fatal(err)
		}
		defer p.close()
		proxies = append(proxies, p)
	}
	down := func() float64 {
		var sum int64
		for _, p := range proxies {
			sum += p.down.Load()
		}
		return float64(sum) / float64(len(proxies))
	}
	kc := kubeconfigVia(b, l, "https://127.0.0.1:"+proxyPort)
	admin, err := l.FastClient()
	if err != nil {
		b.Fatal(err)
	}
	reqs0, err := scrapeInitialRequests(ctx, admin)
	if err != nil {
		b.Fatal(err)
	}
	agents, err := l.StartAgentsNoT(netConf, "--kubeconfig", kc, "--kube-api-content-type", contentType)
	if err != nil {
		b.Fatal(err)
	}
	defer agents.StopAll()
	if err := agents.WaitReady(ctx); err != nil {
		b.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	start := down()
	if reqs, err := scrapeInitialRequests(ctx, admin); err != nil {
		b.Error(err)
	} else {
		wl, list := reqs.since(reqs0)
		b.Logf("%s: the agents' start made WatchList requests %s; LIST requests %s (the lab's controllers' included)", contentType, wl, list)
	}

	rest := restPeriod(b)
	r0 := down()
	time.Sleep(rest)
	perMinute := (down() - r0) / rest.Minutes()
	restRate := (down() - r0) / rest.Seconds()

	// Enough changes, back to back, to stand out of the rest's noise.
	const changes = 200
	cs, err := l.FastClient()
	if err != nil {
		b.Fatal(err)
	}
	c0, t0 := down(), time.Now()
	for i := 1; i <= changes; i++ {
		// A value of this run's own: the same value again is no change.
		patch := fmt.Sprintf(`{"metadata":{"labels":{"gen":"%s-%d"}}}`, map[bool]string{true: "json", false: "pb"}[contentType == "application/json"], i)
		if _, err := cs.CoreV1().Pods(namespace).Patch(ctx, fmt.Sprintf("p-%d", i%pods), types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	time.Sleep(3 * time.Second) // the last events reach the agents
	perChange := (down() - c0 - restRate*time.Since(t0).Seconds()) / changes

	reqs1, err := scrapeInitialRequests(ctx, admin)
	if err != nil {
		b.Fatal(err)
	}
	d0, dt := down(), time.Now()
	dropped := 0
	for _, p := range proxies {
		dropped += p.dropAll()
	}
	time.Sleep(15 * time.Second)
	afterDrop := down() - d0 - restRate*time.Since(dt).Seconds()
	if reqs, err := scrapeInitialRequests(ctx, admin); err == nil {
		wl, list := reqs.since(reqs1)
		b.Logf("%s: after the drop, WatchList requests %s; LIST requests %s", contentType, wl, list)
	}
	if err := agents.WaitReady(ctx); err != nil {
		b.Errorf("agents not ready after their connections dropped: %v", err)
	}

	b.ReportMetric(start, "start-bytes/agent")
	b.ReportMetric(perMinute, "rest-bytes/min/agent")
	b.ReportMetric(perChange, "label-change-bytes/agent")
	b.ReportMetric(afterDrop, "reconnect-bytes/agent")
	b.Logf("%s: start %.0f B, at rest %.0f B/min, one label change %.0f B, after %d connections dropped %.0f B (a relist would cost about the start's)",
		contentType, start, perMinute, perChange, dropped, afterDrop)
}

// kubeconfigVia is the lab's node kubeconfig with another server address.
func kubeconfigVia(b *testing.B, l *labtest.Lab, server string) string {
	raw, err := os.ReadFile(l.NodeKubeconfigAdmin())
	if err != nil {
		b.Fatal(err)
	}
	out := strings.Replace(string(raw), l.APIServerURL(), server, 1)
	path := l.Path("apicost-" + strconv.Itoa(os.Getpid()) + ".kubeconfig")
	if err := os.WriteFile(path, []byte(out), 0o600); err != nil {
		b.Fatal(err)
	}
	return path
}
