package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

// agentAccess is how sluicectl reaches agents: the local agent's
// --health-addr (on a node), a lab node's agent through its network
// namespace (--node with a lab), or an agent through the API server
// (apiAccess, from a workstation with a kubeconfig).
type agentAccess struct {
	lab  labFlags
	addr string
	// node is the agent to ask; "" for the local one, or, for commands
	// that follow pods, the nodes of those pods.
	node string
	api  apiFlags
}

func (a *agentAccess) flags(c *cobra.Command, nodeHelp string) {
	c.Flags().StringVar(&a.addr, "addr", "127.0.0.1:9098", "the agent's --health-addr")
	c.Flags().StringVar(&a.node, "node", "", nodeHelp)
	c.Flags().StringVar(&a.lab.name, "lab", "default", "name of the lab, with --node")
	c.Flags().StringVar(&a.lab.dir, "lab-dir", "", "lab directory, with --node")
	a.api.flags(c)
}

// mode says which way agents are reached: "api" with --kubeconfig (or
// --via api), "lab" when a lab of that name exists, else "local".
func (a *agentAccess) mode() string {
	switch {
	case a.api.via != "":
		return a.api.via
	case a.api.kubeconfig != "":
		return "api"
	}
	if _, err := a.lab.load(); err == nil {
		return "lab"
	}
	return "local"
}

// get reads path from the agent of node ("" for the local agent, or the
// --node one) and returns the body; a non-200 answer is an error with the
// agent's reason.
func (a *agentAccess) get(ctx context.Context, node, path string, query url.Values) ([]byte, error) {
	if node == "" {
		node = a.node
	}
	client, where, err := a.client(ctx, node)
	if err != nil {
		return nil, err
	}
	u := "http://" + a.addr + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reaching the agent %s: %w (is sluiced running, with --health-addr?)", where, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("reading the agent %s: %w", where, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("the agent %s answered %s: %s", where, resp.Status, strings.TrimSpace(string(body)))
	}
	return body, nil
}

// client returns an HTTP client whose connections reach the agent of
// node, and a description of where that is for errors.
func (a *agentAccess) client(ctx context.Context, node string) (*http.Client, string, error) {
	client := &http.Client{Timeout: 10 * time.Second}
	if node == "" {
		return client, "at " + a.addr, nil
	}
	switch a.mode() {
	case "api":
		t, err := a.api.transport(ctx, node)
		if err != nil {
			return nil, "", err
		}
		client.Transport = t
		return client, "on node " + node + " (through the API server)", nil
	case "lab":
		s, err := a.lab.load()
		if err != nil {
			return nil, "", err
		}
		place, err := s.Resolve(node)
		if err != nil {
			return nil, "", err
		}
		client.Transport = &http.Transport{DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
			return place.Dial(network, addr, 5*time.Second)
		}}
		return client, "of lab node " + node, nil
	}
	return client, "at " + a.addr, nil
}

// nodeOfPod finds the node a pod (namespace/name) runs on, "" when that
// cannot be known from here (the local agent answers then).
func (a *agentAccess) nodeOfPod(ctx context.Context, ref string) (string, error) {
	if !strings.Contains(ref, "/") {
		return "", nil // an IP: the model resolves it
	}
	switch a.mode() {
	case "api":
		return a.api.nodeOfPod(ctx, ref)
	case "lab":
		s, err := a.lab.load()
		if err != nil {
			return "", err
		}
		_, n, err := s.FindPod(ref)
		if err != nil {
			return "", err
		}
		return n.Name, nil
	}
	return "", nil
}

// nodes lists the nodes whose agents a cluster-wide command asks: the
// lab's nodes, or the nodes the DaemonSet's pods run on.
func (a *agentAccess) nodes(ctx context.Context) ([]string, error) {
	var out []string
	switch a.mode() {
	case "api":
		pods, err := a.api.agentPods(ctx)
		if err != nil {
			return nil, err
		}
		for n := range pods {
			out = append(out, n)
		}
	case "lab":
		s, err := a.lab.load()
		if err != nil {
			return nil, err
		}
		for _, n := range s.Nodes {
			out = append(out, n.Name)
		}
	default:
		return nil, fmt.Errorf("no cluster to ask: give --kubeconfig (or $KUBECONFIG with --via api), or run it where a lab is")
	}
	sort.Strings(out)
	return out, nil
}

// stream reads path from the agent of node line by line until the agent
// ends the answer or ctx ends, calling fn with each line.
func (a *agentAccess) stream(ctx context.Context, node, path string, query url.Values, fn func([]byte)) error {
	client, where, err := a.client(ctx, node)
	if err != nil {
		return err
	}
	client.Timeout = 0 // a followed stream has no end
	u := "http://" + a.addr + path + "?" + query.Encode()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("reaching the agent %s: %w", where, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		body, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("the agent %s answered %s: %s", where, resp.Status, strings.TrimSpace(string(body)))
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		fn(sc.Bytes())
	}
	if ctx.Err() != nil {
		return nil
	}
	return sc.Err()
}
