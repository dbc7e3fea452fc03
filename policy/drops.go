package policy

// The agent's side of drop logs: each NFLOG record of the drop log group
// is attributed, from the model of the last sync, to the local endpoint,
// the direction and the deciding policy rule or end of tier, counted in
// sluice_policy_drops_total, and kept in a bounded ring that sluicectl
// drops reads and follows.

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"time"

	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/metrics"
	"github.com/sluice-net/sluice/internal/nflog"
)

// Drop is one denied connection, as sluicectl drops prints it.
type Drop struct {
	Seq       uint64    `json:"seq"`
	Time      time.Time `json:"time"`
	Node      string    `json:"node"`
	Direction string    `json:"direction"`
	Src       string    `json:"src"`
	Dst       string    `json:"dst"`
	Protocol  string    `json:"protocol"`
	Port      uint16    `json:"port,omitempty"`
	// Pod is the local endpoint whose policy denied (namespace/name).
	Pod string `json:"pod"`
	// Verdict is "denied" for a drop log, "logged" for a policy's Log
	// rule (the flow goes on to the next rule).
	Verdict string `json:"verdict"`
	// Policy and Rule name the Deny rule, Tier the tier; Reason says it
	// for people.
	Policy string `json:"policy,omitempty"`
	Rule   int    `json:"rule"`
	Tier   string `json:"tier,omitempty"`
	Reason string `json:"reason"`
}

// DropRing keeps the latest drops, and wakes followers on each new one.
type DropRing struct {
	mu    sync.Mutex
	buf   []Drop
	next  uint64 // sequence number of the next drop
	wake  chan struct{}
	lost  uint64
	limit int
}

// NewDropRing keeps up to size drops.
func NewDropRing(size int) *DropRing {
	return &DropRing{limit: size, wake: make(chan struct{})}
}

// Add appends a drop, forgetting the oldest beyond the ring's size.
func (r *DropRing) Add(d Drop) {
	r.mu.Lock()
	d.Seq = r.next
	r.next++
	r.buf = append(r.buf, d)
	if len(r.buf) > r.limit {
		r.buf = r.buf[len(r.buf)-r.limit:]
	}
	close(r.wake)
	r.wake = make(chan struct{})
	r.mu.Unlock()
}

// Since returns the drops from sequence number seq on, the sequence
// number to ask for next, and a channel closed when there are more.
func (r *DropRing) Since(seq uint64) ([]Drop, uint64, <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []Drop
	for _, d := range r.buf {
		if d.Seq >= seq {
			out = append(out, d)
		}
	}
	return out, r.next, r.wake
}

// Lost counts the records the kernel could not deliver (socket overflow).
func (r *DropRing) Lost() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lost
}

func (r *DropRing) addLost() {
	r.mu.Lock()
	r.lost++
	r.mu.Unlock()
}

// RunDropLog reads the drop log group until ctx ends, attributing each
// record to what denied it. It runs in the namespace the loop programs
// (the agent's own); a reader that cannot bind the group is an error
// the caller logs, not a reason to stop the agent.
func (l *Loop) RunDropLog(ctx context.Context, ring *DropRing, logRules bool) error {
	// With logRules, Log rules (Calico's Log action) feed the same
	// stream, from their own group. It is off by default: only one
	// reader can bind a group, and the Log action's records are an
	// operator's (ulogd) to read first.
	if logRules {
		l.readLogRules(ctx, ring)
	}
	r, err := nflog.Open(DropLogGroup)
	if err != nil {
		return err
	}
	return l.readGroup(ctx, r, ring)
}

// readGroup attributes the records of one NFLOG group until ctx ends.
func (l *Loop) readGroup(ctx context.Context, r *nflog.Reader, ring *DropRing) error {
	go func() { <-ctx.Done(); r.Close() }()
	for {
		recs, err := r.Read()
		switch {
		case ctx.Err() != nil:
			return nil
		case errors.Is(err, nflog.ErrLost):
			ring.addLost()
			continue
		case err != nil:
			return fmt.Errorf("reading drop logs: %w", err)
		}
		for _, rec := range recs {
			if d, ok := l.AttributeDrop(rec); ok {
				if d.Verdict == "denied" {
					metrics.PolicyDrops.WithLabelValues(d.Direction, namespaceOf(d.Pod), metricPolicy(d)).Inc()
				}
				ring.Add(d)
				klog.FromContext(ctx).V(4).Info("drop", "drop", d)
			}
		}
	}
}

func namespaceOf(pod string) string {
	ns, _, _ := strings.Cut(pod, "/")
	return ns
}

func metricPolicy(d Drop) string {
	if d.Policy != "" {
		return d.Policy
	}
	return "end-of-tier/" + d.Tier
}

// AttributeDrop names what denied a logged packet, from the model of the
// last sync; ok is false for a record that is not a drop log.
func (l *Loop) AttributeDrop(rec nflog.Record) (Drop, bool) {
	verdict := "denied"
	reason, ok := ParseDropPrefix(rec.Prefix)
	if !ok {
		reason, ok = ParseLogPrefix(rec.Prefix)
		verdict = "logged"
	}
	m := l.model.Load()
	if !ok || m == nil {
		return Drop{}, false
	}
	d := Drop{Time: rec.Time, Node: l.cfg.NodeName, Direction: "ingress", Src: rec.Src.String(), Dst: rec.Dst.String(),
		Protocol: protoName(rec.Proto), Port: rec.DstPort, Rule: -1, Verdict: verdict}
	self := rec.Dst
	if reason.Egress {
		d.Direction, self = "egress", rec.Src
	}
	var ep *LocalEndpoint
	if reason.VethSuffix != "" {
		ep = m.localByVeth(contract.HostVethPrefix + reason.VethSuffix)
		d.Tier = reason.Tier
		d.Reason = "isolated, no rule allowed it (end of tier " + reason.Tier + ")"
	} else {
		ep = m.localByIP(self)
		d.Rule = reason.Rule
		if p := m.policyByHash(reason.PolicyHash); p != nil {
			d.Policy, d.Tier = p.Key, p.tier().Name
			action := "Deny"
			if verdict == "logged" {
				action = "Log"
			}
			d.Reason = fmt.Sprintf("%s: tier %s, %s, %s rule %d", action, d.Tier, RefOf(p), d.Direction, d.Rule)
		} else {
			d.Reason = fmt.Sprintf("Deny rule %d of a policy no longer in the model (chain hash %s)", d.Rule, reason.PolicyHash)
		}
	}
	if ep != nil && ep.Pod != nil {
		d.Pod = ep.Pod.Namespace + "/" + ep.Pod.Name
	}
	return d, true
}

func protoName(p uint8) string {
	switch p {
	case 6:
		return "TCP"
	case 17:
		return "UDP"
	case 132:
		return "SCTP"
	case 1:
		return "ICMP"
	case 58:
		return "ICMPv6"
	}
	return fmt.Sprint(p)
}

func (m *modelSnapshot) localByVeth(veth string) *LocalEndpoint {
	for i := range m.locals {
		if m.locals[i].HostVeth == veth {
			return &m.locals[i]
		}
	}
	return nil
}

func (m *modelSnapshot) localByIP(ip netip.Addr) *LocalEndpoint {
	for i := range m.locals {
		ep := &m.locals[i]
		ips := ep.IPs
		if len(ips) == 0 && ep.Pod != nil {
			ips = ep.Pod.IPs
		}
		for _, a := range ips {
			if a == ip {
				return ep
			}
		}
	}
	return nil
}

// policyByHash finds the policy a chain hash names; the index is built
// once per model.
func (m *modelSnapshot) policyByHash(h string) *Policy {
	ix := m.index
	ix.once.Do(func() {
		ix.byHash = make(map[string]*Policy, len(m.policies))
		for k, p := range m.policies {
			ix.byHash[shortHash(k)] = p
		}
	})
	return ix.byHash[h]
}

// snapshotIndex holds lookups built lazily over one model snapshot.
type snapshotIndex struct {
	once   sync.Once
	byHash map[string]*Policy
}

// readLogRules reads the Log rules' group beside the drops; a node where
// it cannot be bound still logs drops.
func (l *Loop) readLogRules(ctx context.Context, ring *DropRing) {
	logs, err := nflog.Open(DefaultLogGroup)
	if err != nil {
		klog.FromContext(ctx).Error(err, "Log rules are not read; sluicectl drops shows only drops")
		return
	}
	go func() {
		if err := l.readGroup(ctx, logs, ring); err != nil {
			klog.FromContext(ctx).Error(err, "reading Log rules stopped")
		}
	}()
}
