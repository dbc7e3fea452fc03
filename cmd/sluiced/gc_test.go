package main

import (
	"os"
	"runtime/debug"
	"testing"
)

// untouched is the collector's target before applyGCPercent runs: one that
// neither Go's default nor any case below sets, so "left alone" shows.
const untouched = 123

// gcPercentAfter runs applyGCPercent and reads back the collector's target.
func gcPercentAfter(t *testing.T, percent int) int {
	t.Helper()
	before := debug.SetGCPercent(untouched)
	defer debug.SetGCPercent(before)
	applyGCPercent(percent)
	return debug.SetGCPercent(untouched)
}

func TestGCPercent(t *testing.T) {
	if v, ok := os.LookupEnv("GOGC"); ok {
		t.Cleanup(func() { os.Setenv("GOGC", v) })
	}
	os.Unsetenv("GOGC")
	if got := gcPercentAfter(t, defaultGCPercent); got != defaultGCPercent {
		t.Errorf("default: collector target %d, want %d", got, defaultGCPercent)
	}
	if got := gcPercentAfter(t, 70); got != 70 {
		t.Errorf("--gc-percent=70: collector target %d, want 70", got)
	}
	if got := gcPercentAfter(t, -1); got != defaultGCPercent {
		t.Errorf("--gc-percent=-1 must not turn the collector off: target %d, want %d", got, defaultGCPercent)
	}
	t.Setenv("GOGC", "100")
	if got := gcPercentAfter(t, 40); got != untouched {
		t.Errorf("GOGC in the environment must win over --gc-percent (the runtime applied it at start): target %d, want it left at %d", got, untouched)
	}
}
