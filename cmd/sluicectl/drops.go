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

	"github.com/sluice-net/sluice/policy"
)

func newDropsCommand() *cobra.Command {
	a := &agentAccess{}
	var follow bool
	var namespace, pod, output string
	c := &cobra.Command{
		Use:   "drops [-f] [--node NODE] [-n NAMESPACE] [--pod POD]",
		Short: "Connections policy denied, with the pod, direction and the policy or tier that denied them",
		Long: `Each agent logs the first packet of every connection its policy denies
(NFLOG, at most 10 a second per pod and direction, so a flood costs little)
and keeps the latest 4096. drops prints them from every node (through the API
server with --kubeconfig, or a lab), or one (--node), or the local agent;
-f follows them live.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			q := url.Values{"namespace": {namespace}, "pod": {pod}}
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
			return printDrops(cmd.Context(), cmd.OutOrStdout(), a, nodes, q, follow, output)
		},
	}
	a.flags(c, "only this node's agent (default: every node's)")
	c.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing drops as they happen, from every node")
	c.Flags().StringVarP(&namespace, "namespace", "n", "", "only drops of pods in this namespace")
	c.Flags().StringVar(&pod, "pod", "", "only drops of this pod (with -n, or in any namespace)")
	c.Flags().StringVarP(&output, "output", "o", "table", "table or json (one object a line)")
	return c
}

const dropsHeader = "%-12s %-12s %-8s %-40s %-10s %-28s %-7s %s\n"

// printDrops reads each node's drops; without follow, it sorts them by
// time, with it, it prints them as they come.
func printDrops(ctx context.Context, w io.Writer, a *agentAccess, nodes []string, q url.Values, follow bool, output string) error {
	if output != "table" && output != "json" {
		return fmt.Errorf("-o must be table or json, not %q", output)
	}
	var mu sync.Mutex
	var all []policy.Drop
	print := func(d policy.Drop) {
		if output == "json" {
			b, _ := json.Marshal(d)
			fmt.Fprintln(w, string(b))
			return
		}
		port := d.Protocol
		if d.Port != 0 {
			port = fmt.Sprintf("%s/%d", d.Protocol, d.Port)
		}
		fmt.Fprintf(w, dropsHeader, d.Time.Format("15:04:05.000"), d.Node, d.Direction, d.Src+" → "+d.Dst, port, d.Pod, d.Verdict, d.Reason)
	}
	if output == "table" {
		fmt.Fprintf(w, dropsHeader, "TIME", "NODE", "DIR", "SRC → DST", "PROTO", "POD", "VERDICT", "REASON")
	}
	errs := make([]error, len(nodes))
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Go(func() {
			errs[i] = a.stream(ctx, n, "/drops", q, func(line []byte) {
				var d policy.Drop
				if json.Unmarshal(line, &d) != nil {
					return
				}
				mu.Lock()
				defer mu.Unlock()
				if follow {
					print(d)
				} else {
					all = append(all, d)
				}
			})
		})
	}
	wg.Wait()
	sort.SliceStable(all, func(i, j int) bool { return all[i].Time.Before(all[j].Time) })
	for _, d := range all {
		print(d)
	}
	for i, err := range errs {
		if err != nil {
			return fmt.Errorf("node %s: %w", nodes[i], err)
		}
	}
	return nil
}
