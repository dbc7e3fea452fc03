package main

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/http"
	"time"
)

// Watches wait for the API server instead of backing off.
//
// When the API server is down, client-go's reflectors retry their watches
// with an exponential backoff that reaches 30 to 60 s (and is not
// configurable through informer factories). After an outage, an agent
// would so learn of changes up to a minute late. Instead, a watch request
// that cannot reach the server (no HTTP answer) waits here until the API
// probe, which asks /readyz every few seconds, has seen the server answer
// since the failure, then goes again, after a short random delay that
// spreads a cluster's agents. The reflector sees a slow watch, not an
// error, so nothing backs off and nothing relists: the watch resumes from
// the resourceVersion it had. While it waits, the agent costs the API
// server only the probe's one request per period.

// maxReturnSpread is the longest random delay before a waiting watch goes
// again once the API server is back.
const maxReturnSpread = time.Second

// waitForAPI wraps the client's transport (rest.Config.Wrap).
func (p *apiProbe) waitForAPI(next http.RoundTripper) http.RoundTripper {
	return roundTripperFunc(func(req *http.Request) (*http.Response, error) {
		for {
			failed := time.Now()
			resp, err := next.RoundTrip(req)
			if err == nil || req.URL.Query().Get("watch") != "true" || !unreachable(err) || req.Body != nil {
				return resp, err
			}
			if werr := p.waitReachableSince(req.Context(), failed); werr != nil {
				return nil, err
			}
			select {
			case <-req.Context().Done():
				return nil, err
			case <-time.After(rand.N(maxReturnSpread)):
			}
		}
	})
}

// unreachable says the request got no HTTP answer: the server could not be
// dialled, or the connection broke.
func unreachable(err error) bool {
	var op *net.OpError
	return errors.As(err, &op)
}

type roundTripperFunc func(*http.Request) (*http.Response, error)

func (f roundTripperFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// waitReachableSince returns once a check begun after t reached the API
// server, or when ctx ends.
func (p *apiProbe) waitReachableSince(ctx context.Context, t time.Time) error {
	for {
		p.mu.Lock()
		ok, ch := p.okStarted.After(t), p.checked
		p.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-ch:
		}
	}
}
