// Package journal keeps the agent's own kernel writes, as they happen, in
// a bounded in-memory ring for sluicectl changes: each route, neighbour,
// FDB entry, chain and set a loop adds, changes or removes, with the API
// event that caused it (or "drift repair" when the periodic re-read found
// the kernel changed).
//
// Each loop writes the kernel from one goroutine, so a loop sets its cause
// before a sync (SetCause) and the writers it calls record entries
// without having to carry the cause through every function.
package journal

import (
	"fmt"
	"strings"
	"sync"
	"time"
)

// Entry is one kernel write.
type Entry struct {
	Seq  uint64    `json:"seq"`
	Time time.Time `json:"time"`
	Node string    `json:"node"`
	// Loop is "overlay" or "policy"; Kind route, neighbour, fdb, chain,
	// set; Action add, change or remove; Object what was written.
	Loop   string `json:"loop"`
	Kind   string `json:"kind"`
	Action string `json:"action"`
	Object string `json:"object"`
	Cause  string `json:"cause"`
}

// Journal is a bounded ring of entries.
type Journal struct {
	mu     sync.Mutex
	node   string
	limit  int
	buf    []Entry
	next   uint64
	causes map[string]string
	// pending are the API events each loop has not synced yet.
	pending map[string][]string
	wake    chan struct{}
}

// Default is the agent's journal.
var Default = New(2048)

// New keeps up to size entries.
func New(size int) *Journal {
	return &Journal{limit: size, causes: map[string]string{}, wake: make(chan struct{})}
}

// SetNode names the node entries come from.
func (j *Journal) SetNode(node string) {
	j.mu.Lock()
	j.node = node
	j.mu.Unlock()
}

// SetCause sets what the loop's next writes are caused by.
func (j *Journal) SetCause(loop, cause string) {
	j.mu.Lock()
	j.causes[loop] = cause
	j.mu.Unlock()
}

// Add records a write of a loop, with the loop's current cause.
func (j *Journal) Add(loop, kind, action, object string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.buf = append(j.buf, Entry{Seq: j.next, Time: time.Now(), Node: j.node, Loop: loop, Kind: kind, Action: action, Object: object, Cause: j.causes[loop]})
	j.next++
	if len(j.buf) > j.limit {
		j.buf = j.buf[len(j.buf)-j.limit:]
	}
	close(j.wake)
	j.wake = make(chan struct{})
}

// Since returns the entries from sequence number seq on, the number to
// ask for next, and a channel closed when there are more.
func (j *Journal) Since(seq uint64) ([]Entry, uint64, <-chan struct{}) {
	j.mu.Lock()
	defer j.mu.Unlock()
	var out []Entry
	for _, e := range j.buf {
		if e.Seq >= seq {
			out = append(out, e)
		}
	}
	return out, j.next, j.wake
}

// Pending notes an API event a loop will act on at its next sync.
func (j *Journal) Pending(loop, event string) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.pending == nil {
		j.pending = map[string][]string{}
	}
	for _, e := range j.pending[loop] {
		if e == event {
			return
		}
	}
	j.pending[loop] = append(j.pending[loop], event)
}

// StartSync makes the events noted since the last sync the cause of this
// one's writes; with none, a write repairs drift (repair) or is the
// periodic resync's.
func (j *Journal) StartSync(loop string, repair bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	events := j.pending[loop]
	delete(j.pending, loop)
	switch {
	case len(events) > 5:
		j.causes[loop] = strings.Join(events[:5], ", ") + fmt.Sprintf(" and %d more", len(events)-5)
	case len(events) > 0:
		j.causes[loop] = strings.Join(events, ", ")
	case repair:
		j.causes[loop] = "drift repair: the kernel no longer held what was written"
	default:
		j.causes[loop] = "resync"
	}
}
