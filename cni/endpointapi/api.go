// Package endpointapi is the contract between the sluice CNI plugin and the
// local sluiced: the plugin registers each pod's endpoint over a unix socket
// and waits until the agent says it is programmed, so no pod runs
// unprotected.
package endpointapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// DefaultSocket is where sluiced listens.
const DefaultSocket = "/run/sluice/sluiced.sock"

// Endpoint is a pod's network attachment on this node.
type Endpoint struct {
	ContainerID string   `json:"containerID"`
	Namespace   string   `json:"namespace"`
	Pod         string   `json:"pod"`
	PodUID      string   `json:"podUID,omitempty"`
	IfName      string   `json:"ifName"`
	HostVeth    string   `json:"hostVeth"`
	IPs         []string `json:"ips"`
	NetNS       string   `json:"netns,omitempty"`
}

// Key identifies an endpoint: a container may have several interfaces.
func (e Endpoint) Key() string { return e.ContainerID + "/" + e.IfName }

// ErrUnreachable means the agent did not answer: the runtime should retry
// later (CNI error 11).
var ErrUnreachable = errors.New("sluiced is not reachable")

// Client talks to the agent.
type Client struct {
	http *http.Client
}

// NewClient returns a client for the agent's socket.
func NewClient(socket string) *Client {
	return &Client{http: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}}
}

func (c *Client) do(ctx context.Context, method, path string, body any) error {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://sluiced"+path, r)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	switch {
	case resp.StatusCode == http.StatusServiceUnavailable || resp.StatusCode == http.StatusGatewayTimeout:
		return fmt.Errorf("%w: %s", ErrUnreachable, bytes.TrimSpace(msg))
	case resp.StatusCode >= 300:
		return fmt.Errorf("sluiced answered %d: %s", resp.StatusCode, bytes.TrimSpace(msg))
	}
	return nil
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error { return c.do(ctx, http.MethodGet, "/v1/ping", nil) }

// Register hands an endpoint to the agent and returns once the agent has
// programmed it, or when ctx ends.
func (c *Client) Register(ctx context.Context, ep Endpoint) error {
	return c.do(ctx, http.MethodPost, "/v1/endpoints", ep)
}

// Unregister removes an endpoint; removing an unknown one succeeds.
func (c *Client) Unregister(ctx context.Context, containerID, ifName string) error {
	return c.do(ctx, http.MethodDelete, "/v1/endpoints/"+containerID+"/"+ifName, nil)
}

// List returns the agent's endpoints.
func (c *Client) List(ctx context.Context) ([]Endpoint, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://sluiced/v1/endpoints", nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	defer resp.Body.Close()
	var eps []Endpoint
	return eps, json.NewDecoder(resp.Body).Decode(&eps)
}

// Timeout is the default bound on the wait for programming.
const Timeout = 10 * time.Second
