package overlay

import (
	"context"
	"net/netip"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/metrics"
	"github.com/sluice-net/sluice/overlay/srcfilter"
	"github.com/sluice-net/sluice/overlay/vxlan"
)

// Event reasons on a peer's Node.
const (
	// ReasonPeerNotProgrammed: this node could not program the tunnel or
	// route to that peer; the message says why.
	ReasonPeerNotProgrammed = "PeerNotProgrammed"
	// ReasonPeerProgrammed: a peer reported before is programmed again.
	ReasonPeerProgrammed = "PeerProgrammed"
)

// PeerStatus is a peer of one family as the loop last saw it.
type PeerStatus struct {
	vxlan.Peer
	IPv6 bool
	// PublicKey is a wireguard peer's key, and LastHandshake the latest
	// handshake with it (zero before the first).
	PublicKey     string
	LastHandshake time.Time
	// Problem says why the peer is not programmed; empty when it is.
	Problem string
}

// peerKey names a peer of one family; each family's problem is its own.
type peerKey struct {
	node string
	ipv6 bool
}

func familyName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

// withProblems marks the peers that Sync skipped.
func withProblems(peers []PeerStatus, skipped []vxlan.SkippedPeer) []PeerStatus {
	why := map[string]string{}
	for _, s := range skipped {
		why[s.Node] = s.Reason
	}
	for i := range peers {
		if r, ok := why[peers[i].Node]; ok && peers[i].Problem == "" {
			peers[i].Problem = r
		}
	}
	return peers
}

// reportPeers logs and records an Event on a peer's Node when its problem
// appears or changes, and again when it clears; a problem that stays the
// same is reported once, not on every sync. Only the sync goroutine calls
// it.
func (l *Loop) reportPeers(ctx context.Context, peers []PeerStatus) {
	now := map[peerKey]string{}
	present := map[peerKey]bool{}
	for _, p := range peers {
		k := peerKey{p.Node, p.IPv6}
		present[k] = true
		if p.Problem != "" {
			now[k] = p.Problem
		}
	}
	for k, problem := range now {
		l.reportPeer(ctx, k, problem, true)
	}
	for k := range l.problems {
		if _, still := now[k]; !still {
			l.reportPeer(ctx, k, "", present[k])
		}
	}
	l.problems = now
}

// reportNodePeers is reportPeers for one node's peers (status), the others
// unchanged.
func (l *Loop) reportNodePeers(ctx context.Context, node string, status []PeerStatus) {
	for _, v6 := range []bool{false, true} {
		k := peerKey{node, v6}
		problem, present := "", false
		for _, p := range status {
			if p.IPv6 == v6 {
				problem, present = p.Problem, true
			}
		}
		l.reportPeer(ctx, k, problem, present)
		if problem == "" {
			delete(l.problems, k)
		} else {
			if l.problems == nil {
				l.problems = map[peerKey]string{}
			}
			l.problems[k] = problem
		}
	}
}

// reportPeer reports one peer's problem (empty: none) if it differs from
// the one reported last; present is false for a peer that is gone.
func (l *Loop) reportPeer(ctx context.Context, k peerKey, problem string, present bool) {
	logger := klog.FromContext(ctx)
	last, had := l.problems[k]
	switch {
	case problem != "" && problem != last:
		logger.Error(nil, "peer not programmed", "peer", k.node, "family", familyName(k.ipv6), "reason", problem)
		if l.recorder != nil {
			l.recorder.Eventf(nodeRef(k.node), corev1.EventTypeWarning, ReasonPeerNotProgrammed,
				"node %s cannot reach this node's pods over %s: %s", l.cfg.NodeName, familyName(k.ipv6), problem)
		}
	case problem == "" && had && !present:
		logger.Info("peer that was not programmed is gone", "peer", k.node, "family", familyName(k.ipv6))
	case problem == "" && had:
		logger.Info("peer programmed again", "peer", k.node, "family", familyName(k.ipv6))
		if l.recorder != nil {
			l.recorder.Eventf(nodeRef(k.node), corev1.EventTypeNormal, ReasonPeerProgrammed,
				"node %s programmed its %s route to this node's pods again", l.cfg.NodeName, familyName(k.ipv6))
		}
	}
}

// knownNodeAddrs are the underlay addresses of every Node of one family,
// this one included: the sources the VXLAN filter accepts. The advertised
// public IP, an operator's overwrite and the Node's InternalIP and
// ExternalIP all count, since a node's tunnel packets leave from its
// interface address, which the annotation does not show when it was
// overridden (--public-ip, public-ip-overwrite).
func (l *Loop) knownNodeAddrs(nodes []*corev1.Node, v6 bool) []netip.Addr {
	addrs := l.ownAddrs(v6)
	for _, n := range nodes {
		addrs = append(addrs, nodeAddrs(n, v6)...)
	}
	return addrs
}

// ownAddrs are this node's addresses of the family that the source filter
// accepts whatever its Node says.
func (l *Loop) ownAddrs(v6 bool) []netip.Addr {
	if v6 {
		return []netip.Addr{l.publicIP(v6), l.underlay.IP6}
	}
	return []netip.Addr{l.publicIP(v6), l.underlay.IP4}
}

// nodeAddrs are one Node's underlay addresses of the family (see
// knownNodeAddrs), each once.
func nodeAddrs(n *corev1.Node, v6 bool) []netip.Addr {
	keys := []string{AnnPublicIP, AnnPublicIPOverwrite}
	if v6 {
		keys = []string{AnnPublicIPv6, AnnPublicIPv6Overwrite}
	}
	var addrs []netip.Addr
	add := func(a netip.Addr) {
		if !slices.Contains(addrs, a) {
			addrs = append(addrs, a)
		}
	}
	for _, k := range keys {
		if a, err := netip.ParseAddr(n.Annotations[k]); err == nil && a.Is6() == v6 {
			add(a)
		}
	}
	for _, na := range n.Status.Addresses {
		if na.Type != corev1.NodeInternalIP && na.Type != corev1.NodeExternalIP {
			continue
		}
		if a, err := netip.ParseAddr(na.Address); err == nil && a.Unmap().Is6() == v6 {
			add(a.Unmap())
		}
	}
	return addrs
}

// syncSourceFilter keeps, on the vxlan and wireguard backends, the set of
// known node addresses and the INPUT filter that drops tunnel packets to
// the backend's port from anyone else (see package srcfilter). WireGuard
// authenticates every packet, but it also moves a peer's endpoint to
// wherever that peer's packets come from; the filter keeps endpoints on
// node addresses. host-gw has no port to guard: it removes a filter left
// from a former configuration, once.
func (l *Loop) syncSourceFilter(ctx context.Context, f *family, nodes []*corev1.Node, repair, checkRules bool) error {
	logger := klog.FromContext(ctx)
	v6 := f.Is6()
	port := l.backend.port(v6)
	if port == 0 {
		if !f.filterCleared {
			if err := srcfilter.Remove(f.ipt, v6); err != nil {
				logger.Error(err, "removing the VXLAN source filter of a former vxlan backend", "ipv6", v6)
			}
			f.filterCleared = true
		}
		return nil
	}
	flt := srcfilter.Filter{Port: port, IPv6: v6, Tunnel: l.backend.tunnel()}
	n, err := flt.SyncSet(l.knownNodeAddrs(nodes, v6))
	if err != nil {
		return err
	}
	if n > 0 && repair {
		logger.Info("known-node set repaired", "set", flt.SetName(), "changes", n)
		metrics.DriftRepairs.WithLabelValues(repairVXLANInput).Add(float64(n))
	}
	if !checkRules || flt.Check(f.ipt) {
		return nil
	}
	if err := flt.Apply(f.ipt); err != nil {
		return err
	}
	if l.Ready() {
		logger.Info("VXLAN source filter repaired", "ipv6", v6, "chain", srcfilter.Chain)
		countRepair(repairVXLANInput)
	}
	return nil
}

// repairVXLANInput is the drift repair metric's kind for the source filter.
const repairVXLANInput = "vxlan-input"
