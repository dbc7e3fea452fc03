package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/sluice-net/sluice/internal/status"
)

func newStatusCommand() *cobra.Command {
	f := &labFlags{}
	var addr, node, output string
	c := &cobra.Command{
		Use:   "status [--node NODE] [-o table|json|yaml]",
		Short: "Show what the node's sluiced programmed: lease, MTU, peers, endpoints and policies",
		Long: `Reads the local agent's report (http://127.0.0.1:9098/status, --addr to change).
With --node, reads the agent of that lab node (see 'sluicectl lab').`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			client := &http.Client{Timeout: 5 * time.Second}
			if node != "" {
				s, err := f.load()
				if err != nil {
					return err
				}
				place, err := s.Resolve(node)
				if err != nil {
					return err
				}
				client.Transport = &http.Transport{DialContext: func(_ context.Context, network, a string) (net.Conn, error) {
					return place.Dial(network, a, 5*time.Second)
				}}
			}
			resp, err := client.Get("http://" + addr + "/status")
			if err != nil {
				return fmt.Errorf("reading the agent's status at %s: %w (is sluiced running, with --health-addr?)", addr, err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			if err != nil {
				return err
			}
			var r status.Report
			if err := json.Unmarshal(body, &r); err != nil {
				return fmt.Errorf("the agent's status is not a report: %w", err)
			}
			out := cmd.OutOrStdout()
			switch output {
			case "json":
				b, _ := json.MarshalIndent(r, "", "  ")
				fmt.Fprintln(out, string(b))
			case "yaml":
				b, err := yaml.Marshal(r)
				if err != nil {
					return err
				}
				fmt.Fprint(out, string(b))
			case "table", "":
				printReport(out, &r)
			default:
				return fmt.Errorf("-o must be table, json or yaml, not %q", output)
			}
			return nil
		},
	}
	c.Flags().StringVar(&addr, "addr", "127.0.0.1:9098", "the agent's --health-addr")
	c.Flags().StringVar(&node, "node", "", "a lab node whose agent to ask")
	c.Flags().StringVarP(&output, "output", "o", "table", "table, json or yaml")
	c.Flags().StringVar(&f.name, "lab", "default", "name of the lab, with --node")
	c.Flags().StringVar(&f.dir, "lab-dir", "", "lab directory, with --node")
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
	fmt.Fprintf(w, "overlay: %s, lease %s (from %s), backend %s over %s %s, MTU %d, last sync %s\n",
		ready(o.Ready), strings.Join(o.Lease, ","), o.LeaseSource, o.Backend, o.Underlay, strings.Join(o.PublicIPs, ","), o.MTU, since(o.LastSync))
	if o.LastError != "" {
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
