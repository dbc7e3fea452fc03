package overlay

import (
	"time"

	"github.com/sluice-net/sluice/internal/metrics"
	"github.com/sluice-net/sluice/overlay/vxlan"
)

// observeSync records one sync. Its kernel changes count as drift repairs
// only when no Node event asked for them (repair).
func observeSync(d time.Duration, ch vxlan.Changes, err error, repair bool) {
	metrics.ApplyDuration.WithLabelValues("overlay").Observe(d.Seconds())
	if err != nil {
		metrics.ApplyErrors.WithLabelValues("overlay").Inc()
	}
	if !repair {
		return
	}
	for kind, n := range map[string]int{"device": ch.Device, "route": ch.Routes, "neighbour": ch.Neighbours, "fdb": ch.FDB, "peer": ch.Peers, "stale": ch.Removed} {
		if n > 0 {
			metrics.DriftRepairs.WithLabelValues(kind).Add(float64(n))
		}
	}
}

func countRepair(kind string) { metrics.DriftRepairs.WithLabelValues(kind).Inc() }
