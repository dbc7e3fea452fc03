// Package metrics holds sluiced's Prometheus metrics, registered in one
// registry that the agent serves on /metrics.
package metrics
