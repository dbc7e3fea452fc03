package main

import (
	"context"
	"net"
	"net/http"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// refusingTransport refuses the first n requests as a stopped API server
// would, then answers.
type refusingTransport struct {
	n     int32
	calls atomic.Int32
}

func (r *refusingTransport) RoundTrip(*http.Request) (*http.Response, error) {
	if r.calls.Add(1) <= r.n {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	}
	return &http.Response{StatusCode: http.StatusOK, Body: http.NoBody}, nil
}

// markReachable is what a successful probe check records.
func (p *apiProbe) markReachable() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.okStarted = time.Now()
	close(p.checked)
	p.checked = make(chan struct{})
}

func TestWatchWaitsForTheAPIServer(t *testing.T) {
	p := newAPIProbe(time.Second)
	next := &refusingTransport{n: 1}
	rt := p.waitForAPI(next)
	req, _ := http.NewRequest(http.MethodGet, "https://api/api/v1/pods?watch=true&resourceVersion=7", nil)
	done := make(chan error, 1)
	go func() { _, err := rt.RoundTrip(req); done <- err }()
	select {
	case err := <-done:
		t.Fatalf("the watch returned (%v) before the API server was seen back", err)
	case <-time.After(200 * time.Millisecond):
	}
	p.markReachable()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("the watch after the API server's return: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the watch did not go again once the API server was back")
	}
	if c := next.calls.Load(); c != 2 {
		t.Errorf("%d round trips, want 2 (the refused one and the retry)", c)
	}
}

// The control: anything but a watch fails at once, as before.
func TestOtherRequestsFailAtOnce(t *testing.T) {
	p := newAPIProbe(time.Second)
	rt := p.waitForAPI(&refusingTransport{n: 1})
	req, _ := http.NewRequest(http.MethodGet, "https://api/api/v1/pods?limit=500", nil)
	if _, err := rt.RoundTrip(req); err == nil {
		t.Fatal("a list did not fail while the API server refused it")
	}
}

func TestWaitingWatchEndsWithItsContext(t *testing.T) {
	p := newAPIProbe(time.Second)
	rt := p.waitForAPI(&refusingTransport{n: 100})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "https://api/api/v1/nodes?watch=true", nil)
	if _, err := rt.RoundTrip(req); err == nil {
		t.Fatal("a waiting watch outlived its context")
	}
}
