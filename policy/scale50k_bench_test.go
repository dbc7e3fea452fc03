package policy

import (
	"testing"
	"time"
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
