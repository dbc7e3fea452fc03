package main

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sluice-net/sluice/internal/status"
)

func newStatusCommand() *cobra.Command {
	a := &agentAccess{}
	var output string
	c := &cobra.Command{
		Use:   "status [--node NODE] [-o table|json|yaml]",
		Short: "Show what sluiced programmed: per node, or a cluster summary",
		Long: `With --node, the report of that node's agent: lease, MTU, peers, endpoints,
policies and what is wrong. Without it, through the API server (--kubeconfig)
or in a lab, a cluster summary: per node the agent's version, lease, peers
reachable, endpoints and policies programmed and last error, and per policy
on how many nodes it is programmed. On a node with neither, the local agent
at --addr (http://127.0.0.1:9098/status).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out := cmd.OutOrStdout()
			if a.node == "" && a.mode() != "local" {
				sum, err := clusterSummary(cmd.Context(), a)
				if err != nil {
					return err
				}
				return printOutput(out, output, sum, func(w io.Writer) { printSummary(w, sum) })
			}
			body, err := a.get(cmd.Context(), "", "/status", nil)
			if err != nil {
				return err
			}
			var r status.Report
			if err := json.Unmarshal(body, &r); err != nil {
				return fmt.Errorf("the agent's status is not a report: %w", err)
			}
			return printOutput(out, output, r, func(w io.Writer) { printReport(w, &r) })
		},
	}
	a.flags(c, "the node whose agent to ask (a lab node, or any node with --kubeconfig)")
	c.Flags().StringVarP(&output, "output", "o", "table", "table, json or yaml")
	return c
}

func printReport(w io.Writer, r *status.Report) {
	ready := func(b bool) string {
		if b {
			return "ready"
		}
		return "NOT READY"
	}
	o := r.Overlay
	fmt.Fprintf(w, "node %s\n", r.Node)
	if a := r.API; a != nil && !a.Reachable {
		fmt.Fprintf(w, "API server: UNREACHABLE since %s (last contact %s): %s; the kernel keeps the last programmed state, new pods wait (CNI 11)\n",
			since(a.Since), since(a.LastContact), a.LastError)
	} else if a != nil {
		fmt.Fprintf(w, "API server: reachable\n")
	}
	if len(o.Lease) == 0 && !o.Ready {
		// Nothing is programmed yet: the reason is all there is to say.
		reason := o.LastError
		if reason == "" {
			reason = "the agent has not reported why"
		}
		fmt.Fprintf(w, "overlay: NOT READY, no lease: %s\n", reason)
	} else {
		fmt.Fprintf(w, "overlay: %s, lease %s (from %s), backend %s over %s %s, MTU %d, last sync %s\n",
			ready(o.Ready), strings.Join(o.Lease, ","), o.LeaseSource, o.Backend, o.Underlay, strings.Join(o.PublicIPs, ","), o.MTU, since(o.LastSync))
	}
	if o.LastError != "" && len(o.Lease) > 0 {
		fmt.Fprintf(w, "  last error: %s\n", o.LastError)
	}
	tunnelID, head, width := func(p status.Peer) string { return p.VtepMAC }, "VTEP MAC", 18
	if o.Implementation != "" {
		fmt.Fprintf(w, "  wireguard %s (%s), public key %s\n", o.Implementation, o.ImplementationWhy, o.PublicKey)
		tunnelID, head, width = func(p status.Peer) string { return p.PublicKey }, "PUBLIC KEY", 44
	}
	fmt.Fprintf(w, "%-20s %-22s %-16s %-*s %s\n", "PEER", "SUBNET", "NODE IP", width, head, "REACHABLE")
	for _, p := range o.Peers {
		fmt.Fprintf(w, "%-20s %-22s %-16s %-*s %v\n", p.Node, p.Subnet, p.PublicIP, width, tunnelID(p), p.Reachable)
		if p.Problem != "" {
			fmt.Fprintf(w, "  NOT PROGRAMMED: %s\n", p.Problem)
		}
		if o.Implementation != "" && p.Problem == "" {
			hs := "no handshake yet"
			if p.LastHandshake != nil {
				hs = "last handshake " + since(*p.LastHandshake)
			}
			fmt.Fprintf(w, "  %s\n", hs)
		}
	}
	pl := r.Policy
	fmt.Fprintf(w, "policy: %s, %d endpoints, last sync %s\n", ready(pl.Ready), pl.Endpoints, since(pl.LastSync))
	if pl.LastError != "" {
		fmt.Fprintf(w, "  last error: %s\n", pl.LastError)
	}
	if pl.Hooks != "" {
		fmt.Fprintf(w, "  hooks: %s\n", pl.Hooks)
	}
	if pl.Calico != "" {
		fmt.Fprintf(w, "  calico policies from %s\n", pl.Calico)
	}
	if pl.Sources != "" {
		fmt.Fprintf(w, "  sources: %s\n", pl.Sources)
	}
	if len(pl.NotProgrammed) > 0 {
		fmt.Fprintf(w, "  %d policies fail closed (their pods allow nothing these policies would allow):\n", len(pl.NotProgrammed))
		keys := make([]string, 0, len(pl.NotProgrammed))
		for k := range pl.NotProgrammed {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			fmt.Fprintf(w, "    %s: %s\n", k, pl.NotProgrammed[k])
		}
	}
	fmt.Fprintf(w, "%-30s %-15s %-32s %s\n", "ENDPOINT", "VETH", "IPS", "POLICIES")
	sort.Slice(r.Endpoints, func(i, j int) bool { return r.Endpoints[i].Pod < r.Endpoints[j].Pod })
	for _, e := range r.Endpoints {
		fmt.Fprintf(w, "%-30s %-15s %-32s %s\n", e.Pod, e.HostVeth, strings.Join(e.IPs, ","), strings.Join(e.Policies, ","))
	}
}

func since(t time.Time) string {
	if t.IsZero() {
		return "never"
	}
	return time.Since(t).Round(time.Second).String() + " ago"
}
