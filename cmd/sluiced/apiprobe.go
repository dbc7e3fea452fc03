package main

import (
	"context"
	"sync"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/status"
)

// apiProbe asks the API server's /readyz every period, so the agent can say
// plainly in /status that it cannot reach it. Informers only log their
// retries; an outage changes nothing else the agent does: the kernel keeps
// what was programmed, the agent stays ready (its dataplane is complete for
// what it knows), and endpoints of pods it has never seen are refused.
type apiProbe struct {
	client  rest.Interface
	period  time.Duration
	timeout time.Duration

	mu    sync.Mutex
	state status.API
	known bool // a check has finished
	// okStarted is when the latest successful check began; checked is
	// closed and replaced after every check (apiwait.go).
	okStarted time.Time
	checked   chan struct{}
}

// newAPIProbe returns a probe; its client is set before run.
func newAPIProbe(period time.Duration) *apiProbe {
	// A loaded API server may take seconds to answer; that is not an outage.
	return &apiProbe{period: period, timeout: 5 * time.Second, checked: make(chan struct{})}
}

func (p *apiProbe) run(ctx context.Context) {
	t := time.NewTicker(p.period)
	defer t.Stop()
	for {
		p.check(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (p *apiProbe) check(ctx context.Context) {
	began := time.Now()
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	err := p.client.Get().AbsPath("/readyz").Do(ctx).Error()
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	close(p.checked)
	p.checked = make(chan struct{})
	if err == nil {
		p.okStarted = began
	}
	reachable := err == nil
	if !p.known || reachable != p.state.Reachable {
		p.state.Since = now
		if reachable {
			klog.InfoS("API server reachable", "down", p.known)
		} else {
			klog.ErrorS(err, "API server unreachable; the kernel keeps its last programmed state, and endpoints of pods this agent has not seen are refused until it is back")
		}
	}
	p.known, p.state.Reachable = true, reachable
	if reachable {
		p.state.LastContact, p.state.LastError = now, ""
	} else {
		p.state.LastError = err.Error()
	}
}

// report is the probe's part of /status; nil before the first check.
func (p *apiProbe) report() *status.API {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.known {
		return nil
	}
	s := p.state
	return &s
}
