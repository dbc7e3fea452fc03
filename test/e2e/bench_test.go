package e2e

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// BenchmarkLabUp measures `lab up` of a 3-node lab with tools cached, to the
// point where every node is Ready (goal: 60 s). Down is not timed.
func BenchmarkLabUp(b *testing.B) {
	for i := 0; i < b.N; i++ {
		start := time.Now()
		l, err := labtest.Start(lab.Options{Nodes: 3, CNI: lab.CNIReference})
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		b.ReportMetric(time.Since(start).Seconds(), "s/up")
		if err := l.Stop(); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// BenchmarkPodStart measures pod create to Running (with an IP) in the lab,
// through the reference ptp + host-local chain. Goal: p50 at most 1 s.
// Dual-stack pods wait for IPv6 duplicate address detection inside ptp
// (about 2 s), so both cases are reported, and Sluice's own plugin, which
// skips that wait, on a dual-stack lab.
func BenchmarkPodStart(b *testing.B) {
	b.Run("ipv4", func(b *testing.B) {
		l, err := labtest.Start(lab.Options{Nodes: 3, CNI: lab.CNIReference})
		if err != nil {
			b.Fatal(err)
		}
		defer l.Stop()
		benchPodStart(b, l)
	})
	b.Run("dual-stack", func(b *testing.B) { benchPodStart(b, shared) })
	b.Run("sluice-dual-stack", func(b *testing.B) {
		l, err := labtest.Start(lab.Options{Nodes: 3, IPv6: true, CNI: lab.CNISluice})
		if err != nil {
			b.Fatal(err)
		}
		defer l.Stop()
		benchPodStart(b, l)
	})
}

func benchPodStart(b *testing.B, shared *labtest.Lab) {
	ctx := context.Background()
	const perOp = 10
	if err := shared.EnsureNamespace(ctx, "bench"); err != nil {
		b.Fatal(err)
	}
	var lat []time.Duration
	for i := 0; i < b.N; i++ {
		for j := 0; j < perOp; j++ {
			name := fmt.Sprintf("p%d-%d", i, j)
			d, err := timePodStart(ctx, shared, labtest.PodSpec{Namespace: "bench", Name: name, Node: shared.Nodes[j%len(shared.Nodes)].Name,
				Ports: []corev1.ContainerPort{{ContainerPort: 80}}})
			if err != nil {
				b.Fatal(err)
			}
			lat = append(lat, d)
		}
		b.StopTimer()
		_ = shared.Client.CoreV1().Pods("bench").DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
		b.StartTimer()
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Milliseconds()), "p50-ms")
	b.ReportMetric(float64(lat[len(lat)*99/100].Milliseconds()), "p99-ms")
}

func timePodStart(ctx context.Context, shared *labtest.Lab, p labtest.PodSpec) (time.Duration, error) {
	pods := shared.Client.CoreV1().Pods(p.Namespace)
	w, err := pods.Watch(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", p.Name).String()})
	if err != nil {
		return 0, err
	}
	defer w.Stop()
	start := time.Now()
	if _, err := pods.Create(ctx, p.Pod(), metav1.CreateOptions{}); err != nil {
		return 0, err
	}
	timeout := time.After(time.Minute)
	for {
		select {
		case ev := <-w.ResultChan():
			if ev.Type == watch.Error {
				return 0, fmt.Errorf("watch error: %v", ev.Object)
			}
			if pod, ok := ev.Object.(*corev1.Pod); ok && pod.Status.Phase == corev1.PodRunning && pod.Status.PodIP != "" {
				return time.Since(start), nil
			}
		case <-timeout:
			return 0, fmt.Errorf("pod %s not running after a minute", p.Name)
		}
	}
}
