package main

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"

	"github.com/sluice-net/sluice/internal/journal"
	"github.com/sluice-net/sluice/policy"
)

// explainHandler answers sluicectl explain: GET /explain?from=&to=&port=&proto=
// with the policy loop's Explanation as JSON. A query the model cannot
// resolve is the caller's mistake (400), with the reason as the body.
func explainHandler(pl *policy.Loop) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		x, err := pl.Explain(policy.FlowQuery{From: q.Get("from"), To: q.Get("to"), Port: q.Get("port"), Proto: policy.Protocol(q.Get("proto"))})
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(x)
	}
}

// dropRingSize is how many denied connections an agent remembers.
const dropRingSize = 4096

// dropsHandler serves sluicectl drops: GET /drops?since=SEQ returns the
// drops kept from SEQ on as JSON lines; with follow=1 it keeps the
// response open and writes each new drop as it comes. namespace and pod
// filter.
func dropsHandler(ring *policy.DropRing) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		ns, pod := r.URL.Query().Get("namespace"), r.URL.Query().Get("pod")
		streamSince(w, r, ring.Since, func(d policy.Drop) bool {
			return (ns == "" || strings.HasPrefix(d.Pod, ns+"/")) && (pod == "" || strings.HasSuffix(d.Pod, "/"+pod))
		})
	}
}

// changesHandler serves sluicectl changes: GET /changes?since=SEQ, with
// follow=1 to keep writing the kernel writes of the agent as they happen.
func changesHandler(j *journal.Journal) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		streamSince(w, r, j.Since, func(journal.Entry) bool { return true })
	}
}

// streamSince writes the records of a bounded ring (the drops, the
// journal) from ?since=SEQ on as JSON lines, those keep accepts; with
// follow=1 it keeps the response open and writes each new one as the ring
// signals it, until the client goes.
func streamSince[T any](w http.ResponseWriter, r *http.Request, since func(uint64) ([]T, uint64, <-chan struct{}), keep func(T) bool) {
	q := r.URL.Query()
	seq, _ := strconv.ParseUint(q.Get("since"), 10, 64)
	follow := q.Get("follow") == "1"
	w.Header().Set("Content-Type", "application/x-ndjson")
	enc := json.NewEncoder(w)
	flusher, _ := w.(http.Flusher)
	for {
		records, next, more := since(seq)
		for _, rec := range records {
			if !keep(rec) {
				continue
			}
			if err := enc.Encode(rec); err != nil {
				return
			}
		}
		seq = next
		if !follow {
			return
		}
		if flusher != nil {
			flusher.Flush()
		}
		select {
		case <-more:
		case <-r.Context().Done():
			return
		}
	}
}

// matrixHandler serves sluicectl policy matrix:
// GET /matrix?namespaces=a,b&port=&proto=.
func matrixHandler(pl *policy.Loop) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		port, err := strconv.ParseUint(q.Get("port"), 10, 16)
		if err != nil {
			http.Error(w, "port must be a number", http.StatusBadRequest)
			return
		}
		m, err := pl.Matrix(strings.Split(q.Get("namespaces"), ","), int32(port), policy.Protocol(q.Get("proto")))
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(m)
	}
}
