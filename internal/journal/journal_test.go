package journal

import "testing"

// Entries carry their loop's cause at the time of the write, the ring
// keeps the newest, and Since wakes a follower.
func TestJournalKeepsCausesAndBound(t *testing.T) {
	j := New(3)
	j.SetNode("node-1")
	j.SetCause("overlay", "Node node-3 added")
	j.SetCause("policy", "NetworkPolicy x/deny changed")
	j.Add("overlay", "route", "add", "10.244.2.0/24 via 10.244.2.0 dev vx-sluice.1 onlink")
	_, next, more := j.Since(0)
	j.Add("policy", "chain", "add", "SLUICE-PI-1")
	select {
	case <-more:
	default:
		t.Error("a follower was not woken")
	}
	j.Add("policy", "chain", "add", "SLUICE-PI-2")
	j.Add("policy", "set", "add", "SLUICE-S4-1")
	got, _, _ := j.Since(0)
	if len(got) != 3 || got[0].Object != "SLUICE-PI-1" || got[0].Cause != "NetworkPolicy x/deny changed" || got[0].Node != "node-1" {
		t.Errorf("entries %+v", got)
	}
	if got, _, _ := j.Since(next); len(got) != 3 || got[0].Seq != next {
		t.Errorf("since %d: %+v", next, got)
	}
}
