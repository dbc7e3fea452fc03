package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/url"
	"strings"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/sluice-net/sluice/policy"
)

// exitDrift is explain's exit status when a node's kernel disagrees with
// its agent's model, so scripts notice.
const exitDrift = 3

func newExplainCommand() *cobra.Command {
	a := &agentAccess{}
	var output string
	c := &cobra.Command{
		Use:   "explain FROM TO [PORT[/PROTO]]",
		Short: "Why a connection is allowed or dropped: the deciding tier, policy and rule per direction, checked against the kernel",
		Long: `FROM and TO are namespace/pod, an IP, or external:IP. PORT is a number or a
named port of TO; PROTO is TCP (default), UDP or SCTP.

Egress is explained by the agent on FROM's node, ingress by the agent on TO's
node: each names what decided (tier, policy, rule index and action, or "no
policy selects the pod (open)", or "isolated, no rule allowed it"), the
policies that selected the pod and did not match, and what the kernel holds:
whether the endpoint's chains are programmed as the model wants, and the
packet counter of the deciding rule. A model/kernel disagreement is printed
loudly and makes the exit status 3.

Agents are reached through the API server with --kubeconfig (see the README
for the RBAC), through a lab's node namespaces, or at --addr on a node.`,
		Args: cobra.RangeArgs(2, 3),
		RunE: func(cmd *cobra.Command, args []string) error {
			q := url.Values{"from": {args[0]}, "to": {args[1]}}
			if len(args) == 3 {
				port, proto, _ := strings.Cut(args[2], "/")
				q.Set("port", port)
				if proto != "" {
					q.Set("proto", strings.ToUpper(proto))
				}
			}
			x, err := explain(cmd.Context(), a, q)
			if err != nil {
				return err
			}
			if err := printOutput(cmd.OutOrStdout(), output, x, func(w io.Writer) { printExplanation(w, x) }); err != nil {
				return err
			}
			if drifted(x) {
				return exitCode(exitDrift)
			}
			return nil
		},
	}
	a.flags(c, "ask this node's agent for both directions (default: the nodes of FROM and TO)")
	c.Flags().StringVarP(&output, "output", "o", "table", "table, json or yaml")
	return c
}

// explain asks the agent on the source's node for egress and the one on
// the destination's node for ingress (one agent when they share a node,
// or when --node or the local agent answers for both).
func explain(ctx context.Context, a *agentAccess, q url.Values) (*policy.Explanation, error) {
	srcNode, dstNode := a.node, a.node
	if a.node == "" {
		var err error
		if srcNode, err = a.nodeOfPod(ctx, q.Get("from")); err != nil {
			return nil, fmt.Errorf("FROM: %w", err)
		}
		if dstNode, err = a.nodeOfPod(ctx, q.Get("to")); err != nil {
			return nil, fmt.Errorf("TO: %w", err)
		}
		// An end that is not a pod is decided by no policy: the other
		// end's node answers for both.
		if srcNode == "" {
			srcNode = dstNode
		}
		if dstNode == "" {
			dstNode = srcNode
		}
		if srcNode == "" && a.mode() != "local" {
			// Neither end is a pod given by name: any agent's model
			// resolves the addresses.
			nodes, err := a.nodes(ctx)
			if err != nil || len(nodes) == 0 {
				return nil, fmt.Errorf("no agent to ask: %v", err)
			}
			srcNode, dstNode = nodes[0], nodes[0]
		}
	}
	ask := func(node string) (*policy.Explanation, error) {
		body, err := a.get(ctx, node, "/explain", q)
		if err != nil {
			return nil, err
		}
		var x policy.Explanation
		if err := json.Unmarshal(body, &x); err != nil {
			return nil, fmt.Errorf("the agent's answer is not an explanation: %w", err)
		}
		return &x, nil
	}
	x, err := ask(srcNode)
	if err != nil || dstNode == srcNode {
		return x, err
	}
	in, err := ask(dstNode)
	if err != nil {
		return nil, err
	}
	x.Ingress, x.To = in.Ingress, in.To
	x.Node = x.Node + "," + in.Node
	return x, nil
}

// drifted reports whether any node's kernel disagrees with its model.
func drifted(x *policy.Explanation) bool {
	for _, v := range []policy.DirectionVerdict{x.Egress, x.Ingress} {
		if v.Kernel != nil && (len(v.Kernel.Problems) > 0 || !v.Kernel.Programmed) {
			return true
		}
	}
	return false
}

func printOutput(w io.Writer, output string, v any, table func(io.Writer)) error {
	switch output {
	case "json":
		b, _ := json.MarshalIndent(v, "", "  ")
		fmt.Fprintln(w, string(b))
	case "yaml":
		b, err := yaml.Marshal(v)
		if err != nil {
			return err
		}
		fmt.Fprint(w, string(b))
	case "table", "":
		table(w)
	default:
		return fmt.Errorf("-o must be table, json or yaml, not %q", output)
	}
	return nil
}

func printExplanation(w io.Writer, x *policy.Explanation) {
	port := fmt.Sprintf("%s/%d", x.Protocol, x.Port)
	if x.PortName != "" {
		port += " (" + x.PortName + ")"
	}
	fmt.Fprintf(w, "%s -> %s %s\n", endName(x.From), endName(x.To), port)
	for _, v := range []policy.DirectionVerdict{x.Egress, x.Ingress} {
		printDirection(w, v)
	}
	verdict := "DENIED"
	if x.Egress.Allowed && x.Ingress.Allowed {
		verdict = "ALLOWED"
	}
	fmt.Fprintf(w, "verdict: %s\n", verdict)
}

func endName(e policy.ExplainedEnd) string {
	switch {
	case e.Pod != "":
		return e.Pod + " (" + e.IP + ")"
	case e.OwnNode:
		return e.IP + " (the source pod's own node)"
	}
	return e.IP
}

func printDirection(w io.Writer, v policy.DirectionVerdict) {
	verdict := "DENIED"
	if v.Allowed {
		verdict = "allowed"
	}
	who := v.Endpoint
	if who == "" {
		who = "-"
	}
	fmt.Fprintf(w, "%-7s %-20s %-7s %s\n", v.Direction, who, verdict, v.Summary)
	for _, p := range v.NotMatched {
		fmt.Fprintf(w, "        selected the pod, did not match: %s (tier %s)\n", p, p.Tier)
	}
	for _, p := range v.Passed {
		fmt.Fprintf(w, "        passed it on: %s (tier %s)\n", p, p.Tier)
	}
	if v.Staged != "" {
		fmt.Fprintf(w, "        staged: %s\n", v.Staged)
	}
	k := v.Kernel
	if k == nil {
		return
	}
	state := "programmed"
	if !k.Programmed {
		state = "NOT PROGRAMMED as the model wants"
	}
	fmt.Fprintf(w, "        kernel: %s %s; deciding chain %s, %d packets\n", k.EndpointChain, state, k.DecidingChain, k.Packets)
	if k.FailsClosed != "" {
		fmt.Fprintf(w, "        this policy fails closed on the node: %s\n", k.FailsClosed)
	}
	for _, p := range k.Problems {
		fmt.Fprintf(w, "        !!! MODEL/KERNEL DISAGREEMENT: %s\n", p)
	}
}
