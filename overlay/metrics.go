package overlay

import (
	"time"

	"github.com/sluice-net/sluice/internal/metrics"
	"github.com/sluice-net/sluice/overlay/vxlan"
)

func observeSync(d time.Duration, ch vxlan.Changes, err error) {
	metrics.ApplyDuration.WithLabelValues("overlay").Observe(d.Seconds())
	if err != nil {
		metrics.ApplyErrors.WithLabelValues("overlay").Inc()
	}
	for kind, n := range map[string]int{"device": ch.Device, "route": ch.Routes, "neighbour": ch.Neighbours, "fdb": ch.FDB, "stale": ch.Removed} {
		if n > 0 {
			metrics.DriftRepairs.WithLabelValues(kind).Add(float64(n))
		}
	}
}

func countRepair(kind string) { metrics.DriftRepairs.WithLabelValues(kind).Inc() }
