package overlay

import (
	"context"
	"fmt"
	"strings"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/overlay/netconf"
	"github.com/sluice-net/sluice/overlay/vxlan"
)

// backend is what one overlay backend adds to the loop, after flannel's
// backend interface: the loop finds the lease, publishes the annotations,
// keeps masquerade and the source filter and writes subnet.env; a backend
// owns its encapsulation overhead, the backend-data it announces, the port
// its tunnel packets arrive on, and the programming of its peers.
type backend interface {
	// start runs once on the loop's goroutine, in the node's network
	// namespace, once the underlay and the families are known.
	start(ctx context.Context) error
	// stop releases what start took, when the loop ends.
	stop()
	// overhead is the bytes a tunnel adds to a packet over an underlay of
	// the family.
	overhead(v6 bool) int
	// refresh re-reads the backend's local inputs (a key) before the
	// node's annotations are published, on every sync.
	refresh(ctx context.Context) error
	// data is the family's backend-data annotation.
	data(v6 bool) string
	// port is the UDP port the family's tunnel packets arrive on, which
	// the source filter guards; 0 for none. tunnel names the tunnel.
	port(v6 bool) int
	tunnel() string
	// sync programs the peers, routes and devices for these Nodes. A peer
	// that cannot be programmed is returned with its problem and does not
	// stop the others; an error is one that affects them all.
	sync(ctx context.Context, nodes []*corev1.Node) (vxlan.Changes, []PeerStatus, error)
}

// backends is the registry, keyed by flannel's backend type.
var backends = map[string]func(*Loop) backend{
	netconf.BackendVXLAN:     func(l *Loop) backend { return &vxlanBackend{l: l} },
	netconf.BackendHostGW:    func(l *Loop) backend { return &hostGWBackend{l: l} },
	netconf.BackendWireGuard: func(l *Loop) backend { return &wgBackend{l: l} },
}

func newBackend(l *Loop) (backend, error) {
	mk, ok := backends[l.cfg.Net.Backend.Type]
	if !ok {
		return nil, fmt.Errorf("no overlay backend %q", l.cfg.Net.Backend.Type)
	}
	return mk(l), nil
}

// vxlanBackend is flannel's vxlan: a VXLAN device per family, and a
// neighbour entry, an FDB entry and a route per peer (package vxlan).
type vxlanBackend struct{ l *Loop }

func (b *vxlanBackend) start(ctx context.Context) error {
	on, why := checksumOffloadWanted(b.l.cfg.ChecksumOffload, kernelRelease())
	klog.FromContext(ctx).Info("VXLAN TX checksum offload decided", "on", on, "why", why)
	return removeOtherTunnels(ctx, netconf.BackendVXLAN)
}

func (b *vxlanBackend) stop() {}

// overhead: outer IP, UDP, VXLAN and inner Ethernet headers.
func (b *vxlanBackend) overhead(v6 bool) int {
	if v6 {
		return 70
	}
	return 50
}

func (b *vxlanBackend) refresh(context.Context) error { return nil }

func (b *vxlanBackend) data(v6 bool) string {
	return vxlanData(b.l.cfg.Net.Backend.VNI, VtepMAC(b.l.cfg.NodeName, v6))
}

func (b *vxlanBackend) port(bool) int  { return b.l.cfg.Net.Backend.Port }
func (b *vxlanBackend) tunnel() string { return "VXLAN" }

func (b *vxlanBackend) sync(ctx context.Context, nodes []*corev1.Node) (vxlan.Changes, []PeerStatus, error) {
	return b.l.syncTables(ctx, nodes, true)
}

// hostGWBackend is flannel's host-gw: a route per peer via its node
// address, for nodes on one L2 segment; no device, no overhead.
type hostGWBackend struct{ l *Loop }

func (b *hostGWBackend) start(ctx context.Context) error {
	return removeOtherTunnels(ctx, netconf.BackendHostGW)
}
func (b *hostGWBackend) stop()                         {}
func (b *hostGWBackend) overhead(bool) int             { return 0 }
func (b *hostGWBackend) refresh(context.Context) error { return nil }
func (b *hostGWBackend) data(bool) string              { return "null" }
func (b *hostGWBackend) port(bool) int                 { return 0 }
func (b *hostGWBackend) tunnel() string                { return "" }

func (b *hostGWBackend) sync(ctx context.Context, nodes []*corev1.Node) (vxlan.Changes, []PeerStatus, error) {
	return b.l.syncTables(ctx, nodes, false)
}

// removeOtherTunnels deletes the tunnel devices a former configuration
// with another backend left. A VXLAN device left on a wireguard or host-gw
// node would still decapsulate VXLAN from anyone (the source filter now
// guards the new backend's port, or nothing), putting packets into the pod
// network past encryption and filter alike.
func removeOtherTunnels(ctx context.Context, backend string) error {
	links, err := netlinksafe.LinkList()
	if err != nil {
		return fmt.Errorf("listing links: %w", err)
	}
	for _, link := range links {
		name, typ := link.Attrs().Name, link.Type()
		vx := typ == "vxlan" && (strings.HasPrefix(name, vxlanPrefix4) || strings.HasPrefix(name, vxlanPrefix6))
		wg := (typ == "wireguard" || typ == "tuntap") && (name == wgDevice4 || name == wgDevice6)
		if !(vx && backend != netconf.BackendVXLAN || wg && backend != netconf.BackendWireGuard) {
			continue
		}
		if err := netlink.LinkDel(link); err != nil {
			return fmt.Errorf("removing %s, a tunnel of a former backend: %w", name, err)
		}
		klog.FromContext(ctx).Info("removed the tunnel device of a former backend", "device", name, "type", typ)
	}
	return nil
}
