package overlay

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/metrics"
	"github.com/sluice-net/sluice/overlay/netconf"
	"github.com/sluice-net/sluice/overlay/vxlan"
	"github.com/sluice-net/sluice/overlay/wireguard"
)

// The WireGuard devices: one per family in "separate" mode, wgDevice4
// alone carrying both in "auto" mode.
var (
	wgDevice4 = contract.MustTunnelPrefix("wg-sluice")
	wgDevice6 = contract.MustTunnelPrefix("wg6-sluice")
)

// wgBackend is the wireguard backend (package wireguard); only the sync
// goroutine touches it after Run starts it.
type wgBackend struct {
	l       *Loop
	impl    wireguard.Implementation
	keyPath string
	key     wgtypes.Key
	psk     *wgtypes.Key
}

// start picks the implementation and loads the node's key. It runs on the
// loop's goroutine, in the node's network namespace, where the devices are
// made.
func (b *wgBackend) start(ctx context.Context) error {
	l := b.l
	if l.cfg.StateDir == "" {
		return fmt.Errorf("the wireguard backend needs a state directory (--state-dir) for the node's key")
	}
	if err := removeOtherTunnels(ctx, netconf.BackendWireGuard); err != nil {
		return err
	}
	wc := l.cfg.Net.Backend.WireGuard
	impl, why, err := wireguard.Choose(wc.Implementation, wireguard.UserspaceOptions{SocketDir: l.cfg.WireGuardSocketDir})
	if err != nil {
		return err
	}
	klog.FromContext(ctx).Info("WireGuard implementation chosen", "implementation", impl.Name(), "why", why, "mode", wc.Mode)
	b.impl, b.keyPath = impl, filepath.Join(l.cfg.StateDir, wireguard.KeyFile)
	if wc.PSK != "" {
		psk, err := wgtypes.ParseKey(wc.PSK)
		if err != nil {
			impl.Close()
			return fmt.Errorf("Backend.PSK: %w", err)
		}
		b.psk = &psk
	}
	if err := b.refresh(ctx); err != nil {
		impl.Close()
		return err
	}
	l.setStatus(func(s *Status) { s.Implementation, s.ImplementationWhy = impl.Name(), why })
	return nil
}

// stop closes the implementation; see wireguard.Implementation.Close for
// what stays.
func (b *wgBackend) stop() { _ = b.impl.Close() }

// overhead: outer IP and UDP headers, WireGuard's header and its tag.
func (b *wgBackend) overhead(v6 bool) int {
	if v6 {
		return 80
	}
	return 60
}

// refresh reads the key file, making a new key when it is missing: on
// every sync, so --rotate-key or a deleted file takes effect within a
// resync period.
func (b *wgBackend) refresh(ctx context.Context) error {
	key, created, err := wireguard.LoadOrCreateKey(b.keyPath)
	if err != nil {
		return err
	}
	if key != b.key {
		what := "WireGuard key loaded"
		switch {
		case created:
			what = "WireGuard key created"
		case b.key != (wgtypes.Key{}):
			what = "WireGuard key rotated"
		}
		klog.FromContext(ctx).Info(what, "path", b.keyPath, "publicKey", key.PublicKey().String())
		b.key = key
		b.l.setStatus(func(s *Status) { s.PublicKey = key.PublicKey().String() })
	}
	return nil
}

// data is flannel's wireguard backend-data, the same in both families.
func (b *wgBackend) data(bool) string { return wireguardDataOf(b.key.PublicKey().String()) }

func (b *wgBackend) port(v6 bool) int {
	wc := b.l.cfg.Net.Backend.WireGuard
	if v6 && wc.Mode == netconf.WireGuardModeSeparate {
		return wc.ListenPortV6
	}
	return wc.ListenPort
}

func (b *wgBackend) tunnel() string { return "WireGuard" }

func (l *Loop) publishBackendMetric() {
	metrics.OverlayBackend.Reset()
	impl := ""
	if b, ok := l.backend.(*wgBackend); ok {
		impl = b.impl.Name()
	}
	metrics.OverlayBackend.WithLabelValues(l.cfg.Net.Backend.Type, impl).Set(1)
}

// wgPeer is a remote node as the wireguard backend sees it: its key and,
// per family, its subnet and underlay address.
type wgPeer struct {
	node    string
	key     wgtypes.Key
	subnets []netip.Prefix
	ips     []netip.Addr // per subnet
}

// wireGuardPeers reads every remote node, family by family, and returns
// the ones that can be programmed with their status, and the problem of
// each that cannot.
func (b *wgBackend) peers(nodes []*corev1.Node) ([]wgPeer, []PeerStatus) {
	l := b.l
	var peers []wgPeer
	var status []PeerStatus
	for _, n := range nodes {
		if n.Name == l.cfg.NodeName || n.DeletionTimestamp != nil {
			continue
		}
		wp := wgPeer{node: n.Name}
		for _, f := range l.families {
			v6 := f.Is6()
			p, problem, ok := peerOf(n, v6)
			if !ok {
				continue
			}
			var key wgtypes.Key
			if problem == "" {
				key, problem = wireguardKeyOf(n, v6)
			}
			ps := PeerStatus{Peer: p, IPv6: v6, Problem: problem}
			if problem == "" {
				ps.PublicKey = key.String()
				wp.key = key
				wp.subnets = append(wp.subnets, p.Subnet)
				wp.ips = append(wp.ips, p.PublicIP)
			}
			status = append(status, ps)
		}
		if len(wp.subnets) > 0 {
			peers = append(peers, wp)
		}
	}
	return peers, status
}

// wireGuardState is the wanted WireGuard overlay: in "separate" mode a
// device per family whose peers are reached over that family, in "auto"
// mode one device whose peers are reached over the first family they
// have (IPv4 in dual-stack) and carry all their subnets.
func (b *wgBackend) state(peers []wgPeer) wireguard.State {
	l := b.l
	wc := l.cfg.Net.Backend.WireGuard
	lease := l.lease()
	st := wireguard.State{Own: lease, Networks: l.cfg.Net.Networks()}
	base := wireguard.Tunnel{PrivateKey: b.key, PSK: b.psk, Keepalive: time.Duration(wc.PersistentKeepaliveInterval) * time.Second}
	if wc.Mode == netconf.WireGuardModeAuto {
		d := wireguard.Device{Tunnel: base, MTU: l.mtu()}
		d.Name, d.ListenPort = wgDevice4, wc.ListenPort
		for _, own := range lease {
			d.Addrs = append(d.Addrs, own.Addr())
		}
		for _, p := range peers {
			d.Peers = append(d.Peers, wireguard.Peer{Node: p.node, PublicKey: p.key, Endpoint: netip.AddrPortFrom(p.ips[0], uint16(wc.ListenPort)), AllowedIPs: p.subnets})
		}
		st.Devices, st.Stale = []wireguard.Device{d}, []string{wgDevice6}
		return st
	}
	wanted := map[string]bool{}
	for i, f := range l.families {
		d := wireguard.Device{Tunnel: base, MTU: l.mtu(), Addrs: []netip.Addr{lease[i].Addr()}}
		d.Name, d.ListenPort = wgDevice4, wc.ListenPort
		if f.Is6() {
			d.Name, d.ListenPort = wgDevice6, wc.ListenPortV6
		}
		wanted[d.Name] = true
		for _, p := range peers {
			for j, s := range p.subnets {
				if s.Addr().Is6() == f.Is6() {
					d.Peers = append(d.Peers, wireguard.Peer{Node: p.node, PublicKey: p.key, Endpoint: netip.AddrPortFrom(p.ips[j], uint16(d.ListenPort)), AllowedIPs: []netip.Prefix{s}})
				}
			}
		}
		st.Devices = append(st.Devices, d)
	}
	for _, name := range []string{wgDevice4, wgDevice6} {
		if !wanted[name] {
			st.Stale = append(st.Stale, name)
		}
	}
	return st
}

// sync programs the WireGuard devices, peers and routes.
func (b *wgBackend) sync(ctx context.Context, nodes []*corev1.Node) (vxlan.Changes, []PeerStatus, error) {
	peers, status := b.peers(nodes)
	ch, err := wireguard.Sync(b.impl, b.state(peers))
	total := vxlan.Changes{Device: ch.Device, Peers: ch.Peers, Routes: ch.Routes, Removed: ch.Removed}
	if err != nil {
		return total, nil, fmt.Errorf("programming the WireGuard overlay: %w", err)
	}
	if total.Total() > 0 {
		klog.FromContext(ctx).Info("overlay entries written", "backend", "wireguard", "changes", total, "peers", len(peers))
	}
	b.addHandshakes(status)
	return total, status, nil
}

// addHandshakes puts each peer's latest handshake into its status: the
// one sign, besides traffic, that a tunnel is up, and for a userspace
// device the only place an operator sees it without the UAPI socket.
func (b *wgBackend) addHandshakes(status []PeerStatus) {
	last := map[string]time.Time{}
	for _, name := range []string{wgDevice4, wgDevice6} {
		d, err := b.impl.Client().Device(name)
		if err != nil {
			continue // not this mode's device
		}
		for _, p := range d.Peers {
			last[p.PublicKey.String()] = p.LastHandshakeTime
		}
	}
	for i := range status {
		status[i].LastHandshake = last[status[i].PublicKey]
	}
}
