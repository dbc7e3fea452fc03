package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/policy"
)

func newPolicyCommand() *cobra.Command {
	c := &cobra.Command{Use: "policy", Short: "Questions about policy across pods"}
	c.AddCommand(newMatrixCommand())
	return c
}

func newMatrixCommand() *cobra.Command {
	a := &agentAccess{}
	var namespaces, proto, output string
	var port int
	var probe bool
	c := &cobra.Command{
		Use:   "matrix -n NS[,NS...] [--port P] [--probe]",
		Short: "Who can reach whom among the pods of some namespaces, from the model; --probe also measures it",
		Long: `The expected table is computed by an agent from its model, without sending a
packet: for every pair of pods of the namespaces, on --port (and --proto),
whether policy allows it and what decided. With --probe, every pair is also
tried with a real connection, and each cell where the measurement differs
from the model is marked "!!": exactly what to look at. Through the API server
(--kubeconfig) the probe runs "/agnhost connect" (or nc) by exec in each
source pod, which needs create pods/exec in their namespaces; in a lab it
connects from the pods' network namespaces.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if namespaces == "" {
				return fmt.Errorf("-n NAMESPACE[,NAMESPACE...] is required")
			}
			m, err := expectedMatrix(cmd.Context(), a, namespaces, port, proto)
			if err != nil {
				return err
			}
			var observed map[[2]string]bool
			if probe {
				if observed, err = probeMatrix(cmd.Context(), a, m); err != nil {
					return err
				}
			}
			out := cmd.OutOrStdout()
			if output == "json" {
				b, _ := json.MarshalIndent(struct {
					*policy.Matrix
					Observed map[string]bool `json:"observed,omitempty"`
				}{m, flatten(observed)}, "", "  ")
				fmt.Fprintln(out, string(b))
			} else {
				printMatrix(out, m, observed)
			}
			if differs(m, observed) {
				return exitCode(exitDrift)
			}
			return nil
		},
	}
	a.flags(c, "the agent to ask (any node's model gives the same table)")
	c.Flags().StringVarP(&namespaces, "namespace", "n", "", "namespaces whose pods to tabulate, comma-separated")
	c.Flags().IntVar(&port, "port", 80, "destination port")
	c.Flags().StringVar(&proto, "proto", "TCP", "TCP, UDP or SCTP")
	c.Flags().BoolVar(&probe, "probe", false, "also try every pair with a real connection and mark the cells that differ")
	c.Flags().StringVarP(&output, "output", "o", "table", "table or json")
	return c
}

func expectedMatrix(ctx context.Context, a *agentAccess, namespaces string, port int, proto string) (*policy.Matrix, error) {
	node := a.node
	if node == "" && a.mode() != "local" {
		nodes, err := a.nodes(ctx)
		if err != nil {
			return nil, err
		}
		if len(nodes) == 0 {
			return nil, fmt.Errorf("no node to ask")
		}
		node = nodes[0]
	}
	body, err := a.get(ctx, node, "/matrix", url.Values{"namespaces": {namespaces}, "port": {strconv.Itoa(port)}, "proto": {strings.ToUpper(proto)}})
	if err != nil {
		return nil, err
	}
	var m policy.Matrix
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, fmt.Errorf("the agent's answer is not a matrix: %w", err)
	}
	return &m, nil
}

// probeMatrix tries every pair: through the API server by exec into the
// source pods, or in a lab from the pods' own network namespaces.
func probeMatrix(ctx context.Context, a *agentAccess, m *policy.Matrix) (map[[2]string]bool, error) {
	switch a.mode() {
	case "api":
		return probeMatrixThroughAPI(ctx, a, m)
	case "lab":
	default:
		return nil, fmt.Errorf("--probe needs the API server (--kubeconfig) or a lab: it tries connections from the pods")
	}
	s, err := a.lab.load()
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	got := map[[2]string]bool{}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 8)
	for _, c := range m.Cells {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			place, err := s.Resolve(c.From)
			ip, err2 := s.ResolveTarget(c.To, false)
			ok := false
			if err == nil && err2 == nil {
				_, perr := lab.Probe(place, ip, int(m.Port), m.Proto == policy.UDP, time.Second)
				ok = perr == nil
			}
			mu.Lock()
			got[[2]string{c.From, c.To}] = ok
			mu.Unlock()
		})
	}
	wg.Wait()
	return got, nil
}

func flatten(o map[[2]string]bool) map[string]bool {
	if o == nil {
		return nil
	}
	out := map[string]bool{}
	for k, v := range o {
		out[k[0]+" -> "+k[1]] = v
	}
	return out
}

func differs(m *policy.Matrix, observed map[[2]string]bool) bool {
	for _, c := range m.Cells {
		if v, ok := observed[[2]string{c.From, c.To}]; ok && v != c.Allowed {
			return true
		}
	}
	return false
}

// printMatrix prints rows FROM, columns TO: "ok" or "-" as the model
// says, "!!ok" or "!!-" where the probe observed the other.
func printMatrix(w io.Writer, m *policy.Matrix, observed map[[2]string]bool) {
	fmt.Fprintf(w, "%s/%d, expected from the model of %s", m.Proto, m.Port, m.Node)
	if observed != nil {
		fmt.Fprint(w, "; !! marks where the probe observed the opposite")
	}
	fmt.Fprintln(w)
	width := 6
	for _, p := range m.Pods {
		width = max(width, len(p)+1)
	}
	fmt.Fprintf(w, "%-*s", width, "FROM\\TO")
	for _, p := range m.Pods {
		fmt.Fprintf(w, " %-*s", width, p)
	}
	fmt.Fprintln(w)
	cells := map[[2]string]policy.MatrixCell{}
	for _, c := range m.Cells {
		cells[[2]string{c.From, c.To}] = c
	}
	for _, from := range m.Pods {
		fmt.Fprintf(w, "%-*s", width, from)
		for _, to := range m.Pods {
			c, ok := cells[[2]string{from, to}]
			mark := "."
			if ok {
				mark = map[bool]string{true: "ok", false: "-"}[c.Allowed]
				if v, seen := observed[[2]string{from, to}]; seen && v != c.Allowed {
					mark = "!!" + mark
				}
			}
			fmt.Fprintf(w, " %-*s", width, mark)
		}
		fmt.Fprintln(w)
	}
	for _, c := range m.Cells {
		if v, seen := observed[[2]string{c.From, c.To}]; seen && v != c.Allowed {
			fmt.Fprintf(w, "!! %s -> %s: the model says %v (%s), the probe %v\n", c.From, c.To, c.Allowed, c.Why, v)
		}
	}
}
