package manifeste2e

import (
	"context"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// BenchmarkApplyToReady measures `kubectl apply -f manifests/sluice.yaml`
// on a fresh 3-node lab until the DaemonSet's pods are Ready on every node
// (and every node reports NetworkUnavailable=False). Lab up and down are not
// timed. The readiness probe runs every 5 s, so the result moves in steps
// of the probe period.
func BenchmarkApplyToReady(b *testing.B) {
	var total time.Duration
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		l, err := labtest.Start(lab.Options{Nodes: 3, CNI: lab.CNIManifest})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		b.StartTimer()
		start := time.Now()
		err = l.ApplyManifest(ctx, labtest.Manifest())
		if err == nil {
			err = l.WaitAgentsReady(ctx)
		}
		total += time.Since(start)
		b.StopTimer()
		cancel()
		if stopErr := l.Stop(); stopErr != nil {
			b.Error(stopErr)
		}
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "s/apply-to-ready")
}
