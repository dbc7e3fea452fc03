package main

import (
	"encoding/json"
	"net/http"

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
