package main

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/sluice-net/sluice/internal/status"
)

// The summary counts a policy as programmed on the nodes where it selects
// endpoints and does not fail closed, names the nodes where it is not,
// and shows an unreachable agent and each node's first problem.
func TestSummaryCountsProgrammedPolicies(t *testing.T) {
	ok := &status.Report{Node: "node-1", Version: "abc", Overlay: status.Overlay{Ready: true, Lease: []string{"10.244.0.0/24"},
		Peers: []status.Peer{{Node: "node-2", Reachable: true}, {Node: "node-3"}}},
		Policy: status.Policy{Ready: true, Endpoints: 2, Selected: map[string]int{"x/deny": 2, "x/allow": 1}}}
	failing := &status.Report{Node: "node-2", Overlay: status.Overlay{Ready: true, Lease: []string{"10.244.1.0/24"}},
		Policy: status.Policy{Ready: true, Endpoints: 1, Selected: map[string]int{"x/allow": 1},
			NotProgrammed: map[string]string{"x/allow": "ipset SLUICE-C4-1 could not be written"}}}
	s := summarise([]string{"node-1", "node-2", "node-3"}, []*status.Report{ok, failing, nil}, []error{nil, nil, errors.New("connection refused")})
	var b bytes.Buffer
	printSummary(&b, s)
	out := b.String()
	for _, want := range []string{"x/allow", "1 of 2 nodes, NOT on node-2", "x/deny", "1 of 1 nodes", "node-3           UNREACHABLE: connection refused",
		"1/2", "policy x/allow fails closed: ipset SLUICE-C4-1 could not be written"} {
		if !strings.Contains(out, want) {
			t.Errorf("summary lacks %q:\n%s", want, out)
		}
	}
}
