package overlay

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/journal"
	"github.com/sluice-net/sluice/overlay/srcfilter"
	"github.com/sluice-net/sluice/overlay/vxlan"
)

// nodeKeyPrefix marks a queue key that names one remote Node. The queue
// holds a key once, so a burst of events for one node is one sync of it,
// which reads the node as it is by then: the later event supersedes.
const nodeKeyPrefix = "node/"

// peerSyncer is a backend that can program one peer without the others
// (the incremental path). A backend without it gets a full sync for every
// Node change.
type peerSyncer interface {
	// syncPeer programs family i's entries for p (nil: none), replacing
	// those of old (nil: none), the peer as last programmed.
	syncPeer(ctx context.Context, i int, old, p *vxlan.Peer) (vxlan.Changes, error)
}

func (b *vxlanBackend) syncPeer(_ context.Context, i int, old, p *vxlan.Peer) (vxlan.Changes, error) {
	return b.l.syncTablePeer(i, true, old, p)
}

func (b *hostGWBackend) syncPeer(_ context.Context, i int, old, p *vxlan.Peer) (vxlan.Changes, error) {
	return b.l.syncTablePeer(i, false, old, p)
}

func (l *Loop) syncTablePeer(i int, device bool, old, p *vxlan.Peer) (vxlan.Changes, error) {
	v6 := l.families[i].Is6()
	ch, err := vxlan.SyncPeer(l.table(l.lease()[i], v6, device), old, p)
	if err != nil {
		return ch, fmt.Errorf("programming the %s overlay's peer: %w", familyName(v6), err)
	}
	return ch, nil
}

// programmed is what the last full sync and the incremental syncs since
// wrote, per family (the loop's families' order): the "old" side of the
// next incremental sync. Only the sync goroutine touches it.
type programmed struct {
	// valid is false until a full sync succeeds, and after an incremental
	// sync fails: then only a full sync knows what the kernel holds.
	valid bool
	// peers are the programmed peers by node; subnets count the peers
	// programmed with each subnet, so that a subnet two nodes claim is left
	// to the full sync.
	peers   []map[string]vxlan.Peer
	subnets []map[netip.Prefix]int
	// addrs are each node's addresses in the known-node set, refs how many
	// nodes (this one's addresses count once more) hold each.
	addrs []map[string][]netip.Addr
	refs  []map[netip.Addr]int
}

// rebuild records what a full sync wrote.
func (l *Loop) rebuildProgrammed(nodes []*corev1.Node, peers []PeerStatus) {
	p := programmed{valid: true}
	for _, f := range l.families {
		v6 := f.Is6()
		byNode, subnets := map[string]vxlan.Peer{}, map[netip.Prefix]int{}
		for _, ps := range peers {
			if ps.IPv6 == v6 && ps.Problem == "" {
				byNode[ps.Node] = ps.Peer
				subnets[ps.Subnet]++
			}
		}
		addrs, refs := map[string][]netip.Addr{}, map[netip.Addr]int{}
		for _, a := range l.ownAddrs(v6) {
			refs[a.Unmap()]++
		}
		for _, n := range nodes {
			as := nodeAddrs(n, v6)
			addrs[n.Name] = as
			for _, a := range as {
				refs[a]++
			}
		}
		p.peers, p.subnets = append(p.peers, byNode), append(p.subnets, subnets)
		p.addrs, p.refs = append(p.addrs, addrs), append(p.refs, refs)
	}
	l.prog = p
}

// errNeedsFullSync sends a Node change the incremental path cannot take
// (a subnet another peer claims too) to the full sync.
var errNeedsFullSync = errors.New("needs a full sync")

// processPeer syncs one remote Node's change, or falls back to a full sync
// when the incremental path cannot or did not work: before the first full
// sync, for a backend without one, or after an error (a failed apply
// leaves the kernel unknown; the full sync diffs it again).
func (l *Loop) processPeer(ctx context.Context, key, name string) {
	defer l.queue.Forget(key)
	if _, ok := l.backend.(peerSyncer); !ok || !l.prog.valid || !l.Ready() {
		l.nodeChanged()
		return
	}
	journal.Default.StartSync("overlay", false)
	start := time.Now()
	ch, err := l.syncPeerNode(ctx, name)
	observeSync(time.Since(start), ch, err, false)
	if err == nil {
		l.peerSyncs.Add(1)
		klog.FromContext(ctx).V(4).Info("peer synced", "node", name, "changes", ch, "took", time.Since(start))
		return
	}
	if !errors.Is(err, errNeedsFullSync) {
		klog.FromContext(ctx).Error(err, "overlay sync of one peer failed; a full sync follows", "node", name)
	}
	l.prog.valid = false
	l.nodeChanged()
}

// syncPeerNode programs one remote node's peers, family by family, and
// its addresses in the known-node sets.
func (l *Loop) syncPeerNode(ctx context.Context, name string) (vxlan.Changes, error) {
	n, err := l.nodes.Get(name)
	if apierrors.IsNotFound(err) {
		n = nil
	} else if err != nil {
		return vxlan.Changes{}, fmt.Errorf("reading node %s: %w", name, err)
	}
	if l.unchanged(name, n) {
		return vxlan.Changes{}, nil
	}
	var total vxlan.Changes
	var status []PeerStatus
	for i := range l.families {
		ch, ps, err := l.syncPeerFamily(ctx, i, name, n)
		total = addChanges(total, ch)
		if err != nil {
			return total, err
		}
		status = append(status, ps...)
	}
	if err := l.syncPeerAddrs(name, n); err != nil {
		return total, err
	}
	l.reportNodePeers(ctx, name, status)
	l.setStatus(func(s *Status) {
		// In place: Status copies what it hands out.
		s.Peers = slices.DeleteFunc(s.Peers, func(p PeerStatus) bool { return p.Node == name })
		s.Peers = append(s.Peers, status...)
	})
	return total, nil
}

// syncPeerFamily programs family i's peer for node name (n nil: gone).
func (l *Loop) syncPeerFamily(ctx context.Context, i int, name string, n *corev1.Node) (vxlan.Changes, []PeerStatus, error) {
	v6 := l.families[i].Is6()
	var want *vxlan.Peer
	var status []PeerStatus
	if n != nil && n.DeletionTimestamp == nil {
		if p, problem, ok := peerOf(n, v6); ok {
			status = append(status, PeerStatus{Peer: p, IPv6: v6, Problem: problem})
			if problem == "" {
				want = &p
			}
		}
	}
	var oldp *vxlan.Peer
	if old, ok := l.prog.peers[i][name]; ok {
		oldp = &old
		if l.prog.subnets[i][old.Subnet] > 1 {
			return vxlan.Changes{}, nil, fmt.Errorf("node %s's old subnet %s is another's too: %w", name, old.Subnet, errNeedsFullSync)
		}
	}
	if want != nil {
		claimed := l.prog.subnets[i][want.Subnet]
		if oldp != nil && oldp.Subnet == want.Subnet {
			claimed--
		}
		if claimed > 0 || want.Subnet.Overlaps(l.lease()[i]) {
			return vxlan.Changes{}, nil, fmt.Errorf("node %s's subnet %s is another's too: %w", name, want.Subnet, errNeedsFullSync)
		}
	}
	ch, err := l.backend.(peerSyncer).syncPeer(ctx, i, oldp, want)
	if err != nil {
		return ch, nil, err
	}
	if oldp != nil {
		delete(l.prog.peers[i], name)
		l.prog.subnets[i][oldp.Subnet]--
	}
	if want != nil && len(ch.Skipped) == 0 {
		l.prog.peers[i][name] = *want
		l.prog.subnets[i][want.Subnet]++
	}
	if ch.Total() > 0 {
		klog.FromContext(ctx).Info("overlay entries written", "ipv6", v6, "changes", ch, "peer", name)
	}
	return ch, withProblems(status, ch.Skipped), nil
}

// syncPeerAddrs updates the known-node sets for one node: its new
// addresses in, and its old ones out unless another node or this one
// still has them.
func (l *Loop) syncPeerAddrs(name string, n *corev1.Node) error {
	for i, f := range l.families {
		v6 := f.Is6()
		port := l.backend.port(v6)
		var now []netip.Addr
		if n != nil {
			now = nodeAddrs(n, v6)
		}
		was := l.prog.addrs[i][name]
		flt := srcfilter.Filter{Port: port, IPv6: v6, Tunnel: l.backend.tunnel()}
		refs := l.prog.refs[i]
		for _, a := range now {
			if slices.Contains(was, a) {
				continue
			}
			if refs[a]++; refs[a] == 1 && port != 0 {
				if err := flt.AddMember(a); err != nil {
					return err
				}
			}
		}
		for _, a := range was {
			if slices.Contains(now, a) {
				continue
			}
			if refs[a]--; refs[a] == 0 && port != 0 {
				delete(refs, a)
				if err := flt.DelMember(a); err != nil {
					return err
				}
			}
		}
		if n == nil {
			delete(l.prog.addrs[i], name)
		} else {
			l.prog.addrs[i][name] = now
		}
	}
	return nil
}

// unchanged reports that node name (n nil: gone) asks for exactly what was
// programmed for it, with no problem to report: the Add events of every
// Node that reach the loop after its first full sync, for one.
func (l *Loop) unchanged(name string, n *corev1.Node) bool {
	for i, f := range l.families {
		v6 := f.Is6()
		old, had := l.prog.peers[i][name]
		if _, bad := l.problems[peerKey{name, v6}]; bad {
			return false
		}
		if n == nil || n.DeletionTimestamp != nil {
			if had {
				return false
			}
		} else {
			p, problem, ok := peerOf(n, v6)
			if ok != had || problem != "" || (had && !samePeer(old, p)) {
				return false
			}
		}
		var now []netip.Addr
		if n != nil {
			now = nodeAddrs(n, v6)
		}
		if !slices.Equal(now, l.prog.addrs[i][name]) {
			return false
		}
	}
	return true
}

func samePeer(a, b vxlan.Peer) bool {
	return a.Node == b.Node && a.Subnet == b.Subnet && a.PublicIP == b.PublicIP && a.VtepMAC.String() == b.VtepMAC.String()
}

// lightResync decides that a periodic resync with no Node changed skips
// the re-read of the kernel: at 5,000 nodes, listing and diffing every
// route, neighbour, FDB entry and set member (and the rule checks) is
// most of the agent's CPU at rest, and while it runs a Node change waits.
// The incremental path has already written every change, so what such a
// re-read finds is drift, which it repairs every RepairPeriod instead of
// every ResyncPeriod, and at once after the own Node's update. The
// wireguard backend, without the incremental path, still re-reads every
// period.
func (l *Loop) lightResync() bool {
	if _, ok := l.backend.(peerSyncer); !ok || !l.prog.valid {
		return false
	}
	if l.fullWanted.Swap(false) {
		return false
	}
	return time.Since(l.lastFull) < l.cfg.RepairPeriod
}

// syncOwn is the light resync: the own Node's annotations and
// subnet.env, which are cheap to check.
func (l *Loop) syncOwn(ctx context.Context) error {
	self, err := l.nodes.Get(l.cfg.NodeName)
	if err != nil {
		return fmt.Errorf("reading own node: %w", err)
	}
	if err := l.publishAnnotations(ctx, self); err != nil {
		return err
	}
	return writeSubnetEnv(l.cfg.RunDir, l.cfg.Net, l.lease(), l.mtu(), l.cfg.IPMasq)
}
