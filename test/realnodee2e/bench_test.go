package realnodee2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// benchPTPConflist sorts before Sluice's 10-sluice.conflist, so the node's
// containerd uses the reference ptp + host-local chain while it is there.
const benchPTPConflist = "05-bench-ptp.conflist"

func writePTPConflist(b *testing.B, n lab.Node) {
	conf := map[string]any{
		"cniVersion": "1.0.0", "name": "bench-ptp",
		"plugins": []any{
			map[string]any{"type": "ptp", "mtu": 1450, "ipam": map[string]any{
				"type": "host-local", "ranges": [][]map[string]string{{{"subnet": "10.250.0.0/24"}}},
				"routes": []map[string]string{{"dst": "0.0.0.0/0"}}}},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}, "snat": true},
			map[string]any{"type": "bandwidth", "capabilities": map[string]bool{"bandwidth": true}},
		},
	}
	js, _ := json.Marshal(conf)
	p := filepath.Join(n.HostDir("/etc/cni/net.d"), benchPTPConflist)
	if err := os.WriteFile(p, js, 0o644); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.Remove(p) })
}

func p50(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// startPod creates an agnhost pod on a node and returns how long it took
// to be Running with an IP; the pod is deleted afterwards.
func startPod(b *testing.B, ctx context.Context, namespace, name, node string) time.Duration {
	pod := agnhostPod(namespace, name, node)
	start := time.Now()
	if _, err := shared.Client.CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	if _, err := shared.WaitRunning(ctx, namespace, name); err != nil {
		b.Fatal(err)
	}
	d := time.Since(start)
	if err := shared.DeletePod(ctx, namespace, name); err != nil {
		b.Fatal(err)
	}
	return d
}

// BenchmarkPodStartSluiceVsPTP: pod create to Running on real nodes, with
// Sluice's conflist on node-1 and the reference ptp + host-local chain on
// node-3, in the same lab and run, alternating.
func BenchmarkPodStartSluiceVsPTP(b *testing.B) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	sluiceNode, ptpNode := shared.Nodes[0], shared.Nodes[2]
	writePTPConflist(b, ptpNode)
	if err := shared.EnsureNamespace(ctx, "bench"); err != nil {
		b.Fatal(err)
	}
	// containerd reloads its CNI config on a change; one pod proves it.
	time.Sleep(2 * time.Second)
	startPod(b, ctx, "bench", "warm-ptp", ptpNode.Name)
	var sl, ptp []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		sl = append(sl, startPod(b, ctx, "bench", fmt.Sprintf("sluice-%d", i), sluiceNode.Name))
		ptp = append(ptp, startPod(b, ctx, "bench", fmt.Sprintf("ptp-%d", i), ptpNode.Name))
	}
	b.StopTimer()
	ratio := float64(p50(sl)) / float64(p50(ptp))
	b.ReportMetric(float64(p50(sl).Milliseconds()), "sluice-p50-ms")
	b.ReportMetric(float64(p50(ptp).Milliseconds()), "ptp-p50-ms")
	b.ReportMetric(ratio, "p50-ratio")
	b.Logf("pod create to Running: sluice p50 %s %v, ptp p50 %s %v, ratio %.2f (goal <= 1.05)", p50(sl), sl, p50(ptp), ptp, ratio)
}

// BenchmarkLabUpCached: lab up --runtime containerd with 3 nodes and
// Sluice installed, everything built and cached.
func BenchmarkLabUpCached(b *testing.B) {
	var ups, downs []time.Duration
	for i := 0; i < b.N; i++ {
		start := time.Now()
		l, err := labtest.Start(lab.Options{Nodes: 3, Runtime: lab.RuntimeContainerd, Timeout: 5 * time.Minute})
		if err != nil {
			b.Fatal(err)
		}
		ups = append(ups, time.Since(start))
		start = time.Now()
		if err := l.Stop(); err != nil {
			b.Fatal(err)
		}
		downs = append(downs, time.Since(start))
	}
	b.ReportMetric(p50(ups).Seconds(), "up-p50-s")
	b.ReportMetric(p50(downs).Seconds(), "down-p50-s")
	b.Logf("lab up (3 real nodes, Sluice Ready): %v; lab down: %v (goal: up <= 90 s)", ups, downs)
}

// BenchmarkLabRSS: the memory of the whole 3-node lab at rest, the RSS of
// every process of it: control plane, node processes, containerd, kubelets,
// kube-proxies, shims and containers (the sluice agents).
func BenchmarkLabRSS(b *testing.B) {
	var total int64
	byName := map[string]int64{}
	for i := 0; i < b.N; i++ {
		total = 0
		byName = map[string]int64{}
		for _, pid := range labProcesses(shared.State) {
			st, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
			if err != nil {
				continue
			}
			var name string
			var rss int64
			for _, l := range strings.Split(string(st), "\n") {
				if v, ok := strings.CutPrefix(l, "Name:"); ok {
					name = strings.TrimSpace(v)
				}
				if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
					rss, _ = strconv.ParseInt(strings.Fields(v)[0], 10, 64)
				}
			}
			total += rss
			byName[name] += rss
		}
	}
	b.ReportMetric(float64(total)/1024, "lab-rss-MiB")
	var parts []string
	for n, v := range byName {
		parts = append(parts, fmt.Sprintf("%s %d MiB", n, v/1024))
	}
	sort.Strings(parts)
	b.Logf("lab RSS at rest: %d MiB: %s", total/1024, strings.Join(parts, ", "))
}
