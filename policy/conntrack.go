package policy

import (
	"context"
	"net/netip"

	"github.com/containernetworking/plugins/pkg/ns"
	"k8s.io/klog/v2"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// cutDeniedFlows deletes conntrack entries of flows to or from a local
// endpoint that the policies no longer allow, so a new deny also cuts
// connections that conntrack would otherwise pass as established. The
// reference semantics decide each flow, so the cut matches the rules.
func cutDeniedFlows(r cutRequest) (int, error) {
	j := newFlowJudge(r.policies, r.pods, r.namespaces, r.locals)
	j.netsets = r.netsets
	filter := &denyFilter{}
	for _, fam := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		flows, err := netlink.ConntrackTableList(netlink.ConntrackTable, fam)
		if err != nil {
			return 0, err
		}
		for _, f := range flows {
			if j.denied(f.Forward) {
				filter.add(f.Forward)
			}
		}
	}
	if len(filter.tuples) == 0 {
		return 0, nil
	}
	var total uint
	for _, fam := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		n, err := netlinksafe.ConntrackDeleteFilters(netlink.ConntrackTable, fam, filter)
		if err != nil {
			return int(total), err
		}
		total += n
	}
	return int(total), nil
}

// flowJudge decides conntrack flows with the reference semantics, over
// one snapshot of the model.
type flowJudge struct {
	byIP       map[netip.Addr]*Pod
	local      map[netip.Addr]bool
	namespaces map[string]*Namespace
	netsets    []*NetworkSet
	policies   []*Policy
	// selecting caches, per pod, the policies that select it.
	selecting map[*Pod][]*Policy
}

func newFlowJudge(pols map[string]*Policy, pods []*Pod, namespaces map[string]*Namespace, locals []LocalEndpoint) *flowJudge {
	j := &flowJudge{byIP: map[netip.Addr]*Pod{}, local: map[netip.Addr]bool{}, namespaces: namespaces,
		policies: make([]*Policy, 0, len(pols)), selecting: map[*Pod][]*Policy{}}
	for _, p := range pods {
		for _, ip := range p.IPs {
			j.byIP[ip] = p
		}
	}
	for _, ep := range locals {
		for _, ip := range ep.Pod.IPs {
			j.local[ip] = true
		}
	}
	for _, p := range pols {
		j.policies = append(j.policies, p)
	}
	return j
}

// denied reports whether a flow to or from a local endpoint is one the
// policies no longer allow.
func (j *flowJudge) denied(t netlink.IPTuple) bool {
	src, ok1 := netip.AddrFromSlice(t.SrcIP)
	dst, ok2 := netip.AddrFromSlice(t.DstIP)
	if !ok1 || !ok2 {
		return false
	}
	src, dst = src.Unmap(), dst.Unmap()
	if !j.local[src] && !j.local[dst] {
		return false
	}
	proto := protoOf(t.Protocol)
	if proto == "" {
		return false
	}
	s, d := j.endpoint(src), j.endpoint(dst)
	e := &Evaluator{Policies: j.relevant(s.Pod, d.Pod), NetworkSets: j.netsets, Namespaces: j.namespaces}
	return !e.Verdict(Flow{Src: s, Dst: d, Proto: proto, SrcPort: int32(t.SrcPort), DstPort: int32(t.DstPort)}).Allowed()
}

func (j *flowJudge) endpoint(ip netip.Addr) Endpoint {
	if p, ok := j.byIP[ip]; ok {
		return Endpoint{Pod: p, Namespace: j.namespaces[p.Namespace], IP: ip}
	}
	return Endpoint{IP: ip}
}

// relevant returns the policies that select one of the pods. Only they
// can decide a flow; finding them once per pod keeps a sync at scale from
// evaluating every policy for every flow.
func (j *flowJudge) relevant(pods ...*Pod) []*Policy {
	var out []*Policy
	for _, pod := range pods {
		if pod == nil {
			continue
		}
		ps, ok := j.selecting[pod]
		if !ok {
			for _, p := range j.policies {
				if p.Selects(pod, j.namespaces[pod.Namespace]) {
					ps = append(ps, p)
				}
			}
			j.selecting[pod] = ps
		}
		out = append(out, ps...)
	}
	return out
}

func protoOf(p uint8) Protocol {
	switch p {
	case unix.IPPROTO_TCP:
		return TCP
	case unix.IPPROTO_UDP:
		return UDP
	case unix.IPPROTO_SCTP:
		return SCTP
	}
	return ""
}

// denyFilter matches the exact original tuples chosen for deletion.
type denyFilter struct{ tuples []netlink.IPTuple }

func (d *denyFilter) add(t netlink.IPTuple) { d.tuples = append(d.tuples, t) }

func (d *denyFilter) MatchConntrackFlow(f *netlink.ConntrackFlow) bool {
	for _, t := range d.tuples {
		if f.Forward.Protocol == t.Protocol && f.Forward.SrcPort == t.SrcPort && f.Forward.DstPort == t.DstPort &&
			f.Forward.SrcIP.Equal(t.SrcIP) && f.Forward.DstIP.Equal(t.DstIP) {
			return true
		}
	}
	return false
}

// cutRequest is the state after a change, for cutting the flows it no
// longer allows.
type cutRequest struct {
	policies   map[string]*Policy
	pods       []*Pod
	namespaces map[string]*Namespace
	locals     []LocalEndpoint
	netsets    []*NetworkSet
}

// requestCut hands a cut to runCutter, replacing one not yet started: the
// latest state decides.
func (l *Loop) requestCut(r cutRequest) {
	select {
	case <-l.cutFlows:
	default:
	}
	l.cutFlows <- r
}

// runCutter cuts denied flows in the loop's namespace, beside the sync
// goroutine: dumping and deleting conntrack entries should not hold up the
// next policy change.
func (l *Loop) runCutter(ctx context.Context) {
	logger := klog.FromContext(ctx)
	for {
		var r cutRequest
		select {
		case <-ctx.Done():
			return
		case r = <-l.cutFlows:
		}
		if ctx.Err() != nil {
			return
		}
		var n int
		err := l.netns.Do(func(ns.NetNS) error {
			var err error
			n, err = cutDeniedFlows(r)
			return err
		})
		if err != nil {
			logger.Error(err, "cutting denied connections")
		} else if n > 0 {
			logger.Info("cut connections that policy no longer allows", "flows", n)
		}
	}
}
