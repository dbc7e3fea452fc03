package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"sort"
	"sync"

	"github.com/spf13/cobra"

	"github.com/sluice-net/sluice/internal/journal"
)

func newChangesCommand() *cobra.Command {
	a := &agentAccess{}
	var follow bool
	var output string
	c := &cobra.Command{
		Use:   "changes [-f] [--node NODE]",
		Short: "The agents' own kernel writes (routes, neighbours, FDB entries, chains, sets) with the API event that caused each",
		Long: `Each agent journals every route, neighbour and FDB entry (overlay) and every
chain and ipset (policy) it adds, changes or removes, with its cause: the
Node, policy, pod or namespace event it acted on, or a drift repair. It keeps
the latest 2048. changes prints them from every node (through the API server
with --kubeconfig, or a lab), or one (--node), or the local agent; -f
follows them live.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			q := url.Values{}
			if follow {
				q.Set("follow", "1")
			}
			nodes := []string{a.node}
			if a.node == "" && a.mode() != "local" {
				var err error
				if nodes, err = a.nodes(cmd.Context()); err != nil {
					return err
				}
			}
			return printChanges(cmd.Context(), cmd.OutOrStdout(), a, nodes, q, follow, output)
		},
	}
	a.flags(c, "only this node's agent (default: every node's)")
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing writes as they happen, from every node")
	c.Flags().StringVarP(&output, "output", "o", "table", "table or json (one object a line)")
	return c
}

func printChanges(ctx context.Context, w io.Writer, a *agentAccess, nodes []string, q url.Values, follow bool, output string) error {
	if output != "table" && output != "json" {
		return fmt.Errorf("-o must be table or json, not %q", output)
	}
	var mu sync.Mutex
	var all []journal.Entry
	print := func(e journal.Entry) {
		if output == "json" {
			b, _ := json.Marshal(e)
			fmt.Fprintln(w, string(b))
			return
		}
		fmt.Fprintf(w, "%s %-10s %s: %s %s %s\n", e.Time.Format("15:04:05.000"), e.Node, e.Cause, e.Action, e.Kind, e.Object)
	}
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() {
			errs[i] = a.stream(ctx, n, "/changes", q, func(line []byte) {
				var e journal.Entry
				if json.Unmarshal(line, &e) != nil {
					return
				}
				mu.Lock()
				defer mu.Unlock()
				if follow {
					print(e)
				} else {
					all = append(all, e)
				}
			})
		})
	}
	wg.Wait()
	sort.SliceStable(all, func(i, j int) bool { return all[i].Time.Before(all[j].Time) })
	for _, e := range all {
		print(e)
	}
	for i, err := range errs {
		if err != nil {
			return fmt.Errorf("node %s: %w", nodes[i], err)
		}
	}
	return nil
}
