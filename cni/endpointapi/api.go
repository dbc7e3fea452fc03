// Package endpointapi is the contract between the sluice CNI plugin and the
// local sluiced: the plugin registers each pod's endpoint over a unix socket
// and waits until the agent says it is programmed, so no pod runs
// unprotected.
//
// The protocol is one JSON request and one JSON response per connection.
// It is deliberately not HTTP: the plugin is a new process for every ADD,
// and leaving net/http and crypto/tls out of it keeps its start fast.
package endpointapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"
)

// DefaultSocket is where sluiced listens.
const DefaultSocket = "/run/sluice/sluiced.sock"

// Timeout is the default bound on the wait for programming.
const Timeout = 10 * time.Second

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

// Ops.
const (
	OpPing       = "ping"
	OpRegister   = "register"
	OpUnregister = "unregister"
	OpList       = "list"
	OpReport     = "report"
)

// CNI verbs the agent counts. Anything else is refused, so a caller cannot
// grow the metrics' label sets.
const (
	VerbAdd    = "ADD"
	VerbDel    = "DEL"
	VerbCheck  = "CHECK"
	VerbGC     = "GC"
	VerbStatus = "STATUS"
)

// Verbs lists the counted verbs.
var Verbs = []string{VerbAdd, VerbDel, VerbCheck, VerbGC, VerbStatus}

// Outcome is how one CNI call ended, for the agent's metrics. The plugin is
// a new process per call and keeps no counters; the agent does.
type Outcome struct {
	Verb string `json:"verb"`
	// Code is the CNI error code the call returned; 0 means success.
	Code uint `json:"code,omitempty"`
}

// Request is what the plugin sends.
type Request struct {
	Op       string    `json:"op"`
	Endpoint *Endpoint `json:"endpoint,omitempty"`
	// Timeout tells the agent how long the plugin will wait.
	Timeout time.Duration `json:"timeout,omitempty"`
	// Outcome is what a report carries. On a register it is the ADD the
	// registration completes, counted only if the registration succeeds:
	// that saves the successful ADD, the common and latency-critical case,
	// a second round trip.
	Outcome *Outcome `json:"outcome,omitempty"`
}

// Response is what the agent answers.
type Response struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
	// Retry says the failure is temporary (the runtime should retry).
	Retry     bool       `json:"retry,omitempty"`
	Endpoints []Endpoint `json:"endpoints,omitempty"`
}

// ErrUnreachable means the agent did not answer, or answered that it cannot
// program endpoints yet: the runtime should retry later (CNI error 11).
var ErrUnreachable = errors.New("sluiced is not reachable")

// Client talks to the agent.
type Client struct{ socket string }

// NewClient returns a client for the agent's socket.
func NewClient(socket string) *Client { return &Client{socket: socket} }

func (c *Client) call(ctx context.Context, req Request) (*Response, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.socket)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
		req.Timeout = time.Until(dl)
	}
	if err := json.NewEncoder(conn).Encode(req); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrUnreachable, err)
	}
	var resp Response
	if err := json.NewDecoder(conn).Decode(&resp); err != nil {
		return nil, fmt.Errorf("%w: no answer: %v", ErrUnreachable, err)
	}
	if !resp.OK {
		if resp.Retry {
			return &resp, fmt.Errorf("%w: %s", ErrUnreachable, resp.Error)
		}
		return &resp, errors.New(resp.Error)
	}
	return &resp, nil
}

// Ping checks that the agent answers.
func (c *Client) Ping(ctx context.Context) error {
	_, err := c.call(ctx, Request{Op: OpPing})
	return err
}

// Register hands an endpoint to the agent and returns once the agent has
// programmed it, or when ctx ends. It is the last step of an ADD, so the
// agent counts a successful registration as a successful ADD.
func (c *Client) Register(ctx context.Context, ep Endpoint) error {
	_, err := c.call(ctx, Request{Op: OpRegister, Endpoint: &ep, Outcome: &Outcome{Verb: VerbAdd}})
	return err
}

// Report tells the agent how a CNI call ended.
func (c *Client) Report(ctx context.Context, o Outcome) error {
	_, err := c.call(ctx, Request{Op: OpReport, Outcome: &o})
	return err
}

// Unregister removes an endpoint; removing an unknown one succeeds.
func (c *Client) Unregister(ctx context.Context, containerID, ifName string) error {
	_, err := c.call(ctx, Request{Op: OpUnregister, Endpoint: &Endpoint{ContainerID: containerID, IfName: ifName}})
	return err
}

// List returns the agent's endpoints.
func (c *Client) List(ctx context.Context) ([]Endpoint, error) {
	resp, err := c.call(ctx, Request{Op: OpList})
	if err != nil {
		return nil, err
	}
	return resp.Endpoints, nil
}

// PodIPsAnnotation carries a pod's IPs as soon as the agent has wired it,
// before the kubelet reports them in the pod's status, so other nodes can
// use them at once.
const PodIPsAnnotation = "sluice.dev/pod-ips"
