package policy

import (
	"os"
	"runtime"
	"runtime/pprof"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/cni/endpointapi"
)

// benchScale is the cluster scaleObjects builds: issue #5's scale unless
// a benchmark sets another.
var benchScale = struct{ namespaces, pods, local, policies int }{10, 5000, 100, 1000}

// BenchmarkLoopPolicyChangeAt50000Pods is BenchmarkLoopPolicyChange at
// issue #18's scale (50,000 pods in 100 namespaces, 200 local endpoints,
// 10,000 policies), without the lab: it is where a profile of one change
// at that scale comes from (-cpuprofile, -memprofile).
func BenchmarkLoopPolicyChangeAt50000Pods(b *testing.B) {
	saved := benchScale
	defer func() { benchScale = saved }()
	benchScale.namespaces, benchScale.pods, benchScale.local, benchScale.policies = 100, 50000, 200, 10000
	quietKlog()
	began := time.Now()
	change := startScaleLoop(b, false)
	if path := os.Getenv("SLUICE_HEAP_PROFILE"); path != "" {
		// What the loop holds once programmed, while it runs.
		runtime.GC()
		if f, err := os.Create(path); err == nil {
			_ = pprof.WriteHeapProfile(f)
			f.Close()
		}
	}
	b.ReportMetric(time.Since(began).Seconds(), "start-to-ready-s")
	var lat []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		lat = append(lat, change())
	}
	b.StopTimer()
	p50, p99 := percentiles(lat)
	b.ReportMetric(p50, "written-to-applied-p50-ms")
	b.ReportMetric(p99, "written-to-applied-p99-ms")
}

// BenchmarkCommitOneChangeAt50000Pods measures clusterState.Commit alone
// (model to rulesets, no kernel) for one policy created and deleted at
// issue #18's scale: the in-process share of a change's latency.
func BenchmarkCommitOneChangeAt50000Pods(b *testing.B) {
	saved := benchScale
	defer func() { benchScale = saved }()
	benchScale.namespaces, benchScale.pods, benchScale.local, benchScale.policies = 100, 50000, 200, 10000
	pods, nss, pols, locals := scaleObjects()
	s := newClusterState([]*Renderer{{AcceptMark: 0x10000}})
	l := &Loop{}
	for _, n := range nss {
		s.SetNamespace(n.Name, &Namespace{Name: n.Name, Labels: n.Labels})
	}
	for _, p := range pods {
		s.SetPod(p.Namespace+"/"+p.Name, l.modelPod(p))
	}
	for _, p := range pols {
		s.SetPolicy(p.Namespace+"/"+p.Name, FromNetworkPolicy(p))
	}
	eps := map[string]endpointapi.Endpoint{}
	for _, ep := range locals {
		eps[ep.Key()] = ep
	}
	s.SetEndpoints(eps)
	s.Commit()
	gate := FromNetworkPolicy(&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "s0", Name: "gate"}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "app0"}},
		Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "prober"}}}}}},
	}})
	gate.Key = "s0/gate"
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		s.SetPolicy("s0/gate", gate)
		s.Commit()
		s.SetPolicy("s0/gate", nil)
		s.Commit()
	}
}
