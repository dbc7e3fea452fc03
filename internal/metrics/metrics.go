// Package metrics holds sluiced's Prometheus metrics, registered in one
// registry that the agent serves on /metrics.
package metrics

import (
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Registry is the agent's registry.
var Registry = prometheus.NewRegistry()

var (
	// ApplyDuration is how long one sync of a loop took.
	ApplyDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "sluice_apply_duration_seconds",
		Help:    "Time to apply one sync of a loop to the kernel.",
		Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5},
	}, []string{"loop"})
	// ApplyErrors counts failed syncs.
	ApplyErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_apply_errors_total",
		Help: "Syncs of a loop that failed and were retried.",
	}, []string{"loop"})
	// DriftRepairs counts kernel state found wrong and put right, by kind.
	DriftRepairs = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_drift_repairs_total",
		Help: "Kernel entries found missing or wrong and repaired, by kind.",
	}, []string{"kind"})
	// IPTablesRestoreFailures counts failed iptables-restore runs.
	IPTablesRestoreFailures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "sluice_iptables_restore_failures_total",
		Help: "iptables-restore runs that failed.",
	})
)

func init() {
	Registry.MustRegister(ApplyDuration, ApplyErrors, DriftRepairs, IPTablesRestoreFailures,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
}
