package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"sync"

	"github.com/sluice-net/sluice/internal/status"
)

// Summary is the cluster view of sluicectl status: one row per node, and
// per policy the nodes that program it.
type Summary struct {
	Nodes    []NodeSummary   `json:"nodes"`
	Policies []PolicySummary `json:"policies"`
}

// NodeSummary is one node's row; Error is set when its agent could not be
// reached, and then nothing else is known.
type NodeSummary struct {
	Node           string `json:"node"`
	Error          string `json:"error,omitempty"`
	Version        string `json:"version,omitempty"`
	OverlayReady   bool   `json:"overlayReady"`
	PolicyReady    bool   `json:"policyReady"`
	Lease          string `json:"lease,omitempty"`
	Peers          int    `json:"peers"`
	PeersReachable int    `json:"peersReachable"`
	Endpoints      int    `json:"endpoints"`
	Policies       int    `json:"policies"`
	// LastError is the first thing wrong on the node, in the agent's
	// words: the overlay's or the policy loop's last error, hooks,
	// sources, a peer not programmed, a policy failing closed.
	LastError string `json:"lastError,omitempty"`
}

// PolicySummary says on how many of the nodes where a policy selects
// endpoints it is programmed (not failing closed, policy loop ready).
type PolicySummary struct {
	Policy     string   `json:"policy"`
	Programmed int      `json:"programmed"`
	Nodes      int      `json:"nodes"`
	NotOn      []string `json:"notProgrammedOn,omitempty"`
}

// clusterSummary asks every node's agent for its report, in parallel.
func clusterSummary(ctx context.Context, a *agentAccess) (*Summary, error) {
	nodes, err := a.nodes(ctx)
	if err != nil {
		return nil, err
	}
	reports := make([]*status.Report, len(nodes))
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() {
			body, err := a.get(ctx, n, "/status", nil)
			if err == nil {
				var r status.Report
				if err = json.Unmarshal(body, &r); err == nil {
					reports[i] = &r
				}
			}
			errs[i] = err
		})
	}
	wg.Wait()
	return summarise(nodes, reports, errs), nil
}

// summarise builds the summary from the reports (nil where errs says why).
func summarise(nodes []string, reports []*status.Report, errs []error) *Summary {
	sum := &Summary{}
	type tally struct {
		programmed int
		notOn      []string
	}
	policies := map[string]*tally{}
	count := func(key, node string, ok bool) {
		t := policies[key]
		if t == nil {
			t = &tally{}
			policies[key] = t
		}
		if ok {
			t.programmed++
		} else {
			t.notOn = append(t.notOn, node)
		}
	}
	for i, node := range nodes {
		r := reports[i]
		if r == nil {
			sum.Nodes = append(sum.Nodes, NodeSummary{Node: node, Error: errs[i].Error()})
			continue
		}
		row := NodeSummary{Node: node, Version: r.Version, OverlayReady: r.Overlay.Ready, PolicyReady: r.Policy.Ready,
			Lease: strings.Join(r.Overlay.Lease, ","), Peers: len(r.Overlay.Peers), Endpoints: r.Policy.Endpoints,
			Policies: len(r.Policy.Selected), LastError: firstProblem(r)}
		for _, p := range r.Overlay.Peers {
			if p.Reachable {
				row.PeersReachable++
			}
		}
		sum.Nodes = append(sum.Nodes, row)
		for key := range r.Policy.Selected {
			_, failing := r.Policy.NotProgrammed[key]
			count(key, node, r.Policy.Ready && !failing)
		}
		for key := range r.Policy.NotProgrammed {
			if _, counted := r.Policy.Selected[key]; !counted {
				count(key, node, false)
			}
		}
	}
	for key, t := range policies {
		sort.Strings(t.notOn)
		sum.Policies = append(sum.Policies, PolicySummary{Policy: key, Programmed: t.programmed, Nodes: t.programmed + len(t.notOn), NotOn: t.notOn})
	}
	sort.Slice(sum.Policies, func(i, j int) bool { return sum.Policies[i].Policy < sum.Policies[j].Policy })
	return sum
}

// firstProblem is the first thing a node's report says is wrong.
func firstProblem(r *status.Report) string {
	for _, p := range []string{r.Overlay.LastError, r.Policy.LastError, r.Policy.Hooks, r.Policy.Sources} {
		if p != "" {
			return p
		}
	}
	for _, p := range r.Overlay.Peers {
		if p.Problem != "" {
			return "peer " + p.Node + " not programmed: " + p.Problem
		}
	}
	keys := make([]string, 0, len(r.Policy.NotProgrammed))
	for k := range r.Policy.NotProgrammed {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	if len(keys) > 0 {
		return fmt.Sprintf("policy %s fails closed: %s", keys[0], r.Policy.NotProgrammed[keys[0]])
	}
	return ""
}

func printSummary(w io.Writer, s *Summary) {
	fmt.Fprintf(w, "%-16s %-14s %-9s %-9s %-30s %-7s %-9s %-8s %s\n", "NODE", "VERSION", "OVERLAY", "POLICY", "LEASE", "PEERS", "ENDPOINTS", "POLICIES", "LAST ERROR")
	ready := map[bool]string{true: "ready", false: "NOT READY"}
	for _, n := range s.Nodes {
		if n.Error != "" {
			fmt.Fprintf(w, "%-16s UNREACHABLE: %s\n", n.Node, n.Error)
			continue
		}
		lease := n.Lease
		if lease == "" {
			lease = "none"
		}
		fmt.Fprintf(w, "%-16s %-14s %-9s %-9s %-30s %-7s %-9d %-8d %s\n", n.Node, n.Version, ready[n.OverlayReady], ready[n.PolicyReady], lease,
			fmt.Sprintf("%d/%d", n.PeersReachable, n.Peers), n.Endpoints, n.Policies, n.LastError)
	}
	if len(s.Policies) == 0 {
		return
	}
	fmt.Fprintf(w, "\n%-50s %s\n", "POLICY", "PROGRAMMED (on the nodes where it selects endpoints)")
	for _, p := range s.Policies {
		line := fmt.Sprintf("%-50s %d of %d nodes", p.Policy, p.Programmed, p.Nodes)
		if len(p.NotOn) > 0 {
			line += ", NOT on " + strings.Join(p.NotOn, ",")
		}
		fmt.Fprintln(w, line)
	}
}
