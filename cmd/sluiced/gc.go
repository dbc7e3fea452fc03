package main

import (
	"os"
	"runtime/debug"

	"k8s.io/klog/v2"
)

// defaultGCPercent is the garbage collector's target when neither --gc-percent
// nor GOGC says otherwise. Go's default of 100 lets the heap grow to twice
// what is live before collecting, and the agent's live heap is mostly
// long-lived caches (every Node and Pod the informers hold, the pod models,
// the rendered rules): at 50,000 pods that doubling was half the RSS. 40 is
// what Calico's Felix ships (goGCThreshold) for the same kind of agent; the
// price is more frequent collections during bursts of changes, which are
// cheap here because little of the heap is garbage.
const defaultGCPercent = 40

// applyGCPercent sets the collector's target. GOGC in the environment wins,
// as the Go runtime documents; a negative percent turns the collector off
// and is refused. GOMEMLIMIT, when set, is applied by the runtime itself.
func applyGCPercent(percent int) {
	if v, ok := os.LookupEnv("GOGC"); ok {
		klog.InfoS("Garbage collector target from the environment", "GOGC", v)
		return
	}
	if percent <= 0 {
		klog.InfoS("Ignoring --gc-percent that would turn the collector off; keeping the default", "gcPercent", percent, "default", defaultGCPercent)
		percent = defaultGCPercent
	}
	debug.SetGCPercent(percent)
}
