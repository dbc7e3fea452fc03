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
	// PolicyEndpoints counts, per policy, the local endpoints it selects.
	PolicyEndpoints = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "sluice_policy_selected_endpoints",
		Help: "Local endpoints each policy selects on this node.",
	}, []string{"policy"})
	// EndpointsProgrammed and PoliciesProgrammed are the sizes of the last
	// applied policy state.
	EndpointsProgrammed = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "sluice_endpoints_programmed",
		Help: "Local pod endpoints whose chains are programmed.",
	})
	PoliciesProgrammed = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "sluice_policies_programmed",
		Help: "Network policies in the last applied state.",
	})
	// PolicyDrops counts the drop logs of denied connections (the first
	// packet of each, rate-limited per endpoint: a floor, not a packet
	// count) by direction, the local pod's namespace and the deciding
	// policy's key, or "end-of-tier/<tier>". Its cardinality is bounded
	// by namespaces times the policies and tiers that select their pods:
	// no pod or IP labels.
	PolicyDrops = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_policy_drops_total",
		Help: "Denied connections logged, by direction, namespace of the local pod and deciding policy (or end-of-tier/TIER).",
	}, []string{"direction", "namespace", "policy"})
	// CNIRequests counts the CNI plugin's calls on this node by verb and
	// result ("ok" or "error"), as the plugin reports them. Calls made
	// while the agent was down are not counted.
	CNIRequests = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_cni_requests_total",
		Help: "CNI plugin calls on this node, by verb and result (ok, error).",
	}, []string{"verb", "result"})
	// CNIErrors counts failed CNI calls by verb and CNI error code (11 is
	// "try again later", 999 an internal error).
	CNIErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_cni_errors_total",
		Help: "Failed CNI plugin calls on this node, by verb and CNI error code.",
	}, []string{"verb", "code"})
	// PoliciesNotProgrammed counts the policies that fail closed on this
	// node: "invalid" ones could not be converted, "kernel" ones were
	// refused by the kernel (a rule or a set).
	PoliciesNotProgrammed = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "sluice_policies_not_programmed",
		Help: "Policies that fail closed on this node, by reason (invalid, kernel).",
	}, []string{"reason"})
	// SpoofedPacketsDropped counts packets from pod veths whose source
	// address was not the pod's, by family.
	SpoofedPacketsDropped = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "sluice_spoofed_packets_dropped_total",
		Help: "Packets from pods dropped because their source address was not the pod's own, by family (read every resync period).",
	}, []string{"family"})
	// OverlayBackend says which backend the overlay runs and, for
	// wireguard, which implementation the agent chose (kernel or
	// userspace; "" for the other backends). Its one series is 1.
	OverlayBackend = prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "sluice_overlay_backend_info",
		Help: "1 for the overlay backend this agent runs and, for wireguard, its implementation (kernel, userspace).",
	}, []string{"backend", "implementation"})
	// IPTablesRestoreFailures counts failed iptables-restore runs.
	IPTablesRestoreFailures = prometheus.NewCounter(prometheus.CounterOpts{
		Name: "sluice_iptables_restore_failures_total",
		Help: "iptables-restore runs that failed.",
	})
)

func init() {
	Registry.MustRegister(PoliciesNotProgrammed, SpoofedPacketsDropped, PolicyDrops)
	for _, fam := range []string{"ipv4", "ipv6"} {
		SpoofedPacketsDropped.WithLabelValues(fam)
	}
	Registry.MustRegister(ApplyDuration, ApplyErrors, DriftRepairs, IPTablesRestoreFailures,
		PolicyEndpoints, EndpointsProgrammed, PoliciesProgrammed, CNIRequests, CNIErrors, OverlayBackend,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	// Series exist from the start, at zero, so rate() and alerts work
	// before the first error or repair.
	for _, loop := range []string{"overlay", "policy"} {
		ApplyDuration.WithLabelValues(loop)
		ApplyErrors.WithLabelValues(loop)
	}
	for _, kind := range []string{"device", "route", "neighbour", "fdb", "peer", "stale", "masquerade", "vxlan-input", "policy-chain", "policy-ipset", "policy-hook"} {
		DriftRepairs.WithLabelValues(kind)
	}
	for _, reason := range []string{"invalid", "kernel"} {
		PoliciesNotProgrammed.WithLabelValues(reason)
	}
	for _, verb := range []string{"ADD", "DEL", "CHECK", "GC", "STATUS"} {
		for _, result := range []string{"ok", "error"} {
			CNIRequests.WithLabelValues(verb, result)
		}
	}
}
