package wireguard

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sluice-net/sluice/overlay/routes"
)

// Device is the wanted state of one WireGuard device: its tunnel, its MTU
// and the node's own address of each family it carries.
type Device struct {
	Tunnel
	MTU int
	// Addrs are the node's pod-subnet addresses (its subnets' first
	// addresses, as the VXLAN VTEPs have): traffic from the node to remote
	// pods leaves with one of them as its source, which the peer's allowed
	// IPs accept.
	Addrs []netip.Addr
}

// State is the node's whole wanted WireGuard overlay.
type State struct {
	Devices []Device
	// Own are the node's pod subnets (blackholed, as with every backend).
	Own []netip.Prefix
	// Networks are the cluster networks, blackholed behind the peers'
	// routes: a pod packet for a subnet with no peer, or sent while the
	// device is missing, is dropped rather than leaving by the default
	// route in the clear.
	Networks []netip.Prefix
	// Stale are devices of another mode or family that must go.
	Stale []string
}

// Changes counts what Sync wrote or removed.
type Changes struct {
	Device, Peers, Routes, Removed int
}

// Sync makes devices, addresses, WireGuard configuration and routes match
// the state, in that order: a peer's route appears only once its peer
// entry is there, so no packet for it is sent before it can be encrypted.
func Sync(impl Implementation, st State) (Changes, error) {
	var ch Changes
	for _, name := range st.Stale {
		if _, err := netlink.LinkByName(name); err == nil {
			if err := impl.Remove(name); err != nil {
				return ch, err
			}
			ch.Removed++
		}
	}
	want := map[int]map[netip.Prefix]netlink.Route{}
	for _, own := range st.Own {
		routesOf(want, own).set(routes.Blackhole(own))
	}
	for _, n := range st.Networks {
		routesOf(want, n).set(routes.Blackhole(n))
	}
	for _, d := range st.Devices {
		index, dc, err := syncDevice(impl, d)
		ch.Device += dc.Device
		ch.Peers += dc.Peers
		ch.Removed += dc.Removed
		if err != nil {
			return ch, err
		}
		for _, p := range d.Peers {
			for _, a := range p.AllowedIPs {
				routesOf(want, a).set(netlink.Route{Dst: routes.IPNet(a), LinkIndex: index, Scope: netlink.SCOPE_LINK,
					Protocol: routes.Protocol, Family: routes.Family(a.Addr())})
			}
		}
	}
	for fam, w := range want {
		n, removed, err := routes.Sync(fam, w)
		ch.Routes, ch.Removed = ch.Routes+n, ch.Removed+removed
		if err != nil {
			return ch, err
		}
	}
	return ch, nil
}

type routeSet map[netip.Prefix]netlink.Route

func routesOf(want map[int]map[netip.Prefix]netlink.Route, p netip.Prefix) routeSet {
	fam := routes.Family(p.Addr())
	if want[fam] == nil {
		want[fam] = map[netip.Prefix]netlink.Route{}
	}
	return want[fam]
}

func (s routeSet) set(r netlink.Route) {
	p, _ := routes.PrefixOf(r.Dst)
	s[p] = r
}

// syncDevice ensures one device and returns its interface index.
func syncDevice(impl Implementation, d Device) (int, Changes, error) {
	var ch Changes
	created, err := impl.Ensure(d.Name, d.MTU)
	if err != nil {
		return 0, ch, err
	}
	if created {
		ch.Device++
	}
	link, err := netlink.LinkByName(d.Name)
	if err != nil {
		return 0, ch, fmt.Errorf("reading %s: %w", d.Name, err)
	}
	n, err := ensureAddrs(link, d.Addrs)
	if err != nil {
		return 0, ch, err
	}
	ch.Device += n
	cc, err := Configure(impl.Client(), d.Tunnel)
	ch.Device += cc.Device
	ch.Peers += cc.Peers
	ch.Removed += cc.Removed
	if err != nil {
		return 0, ch, err
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return 0, ch, fmt.Errorf("bringing up %s: %w", d.Name, err)
		}
		ch.Device++
	}
	return link.Attrs().Index, ch, nil
}

// ensureAddrs gives the device exactly these global addresses, as host
// routes (/32, /128), and returns how many it added or removed.
func ensureAddrs(link netlink.Link, want []netip.Addr) (int, error) {
	have, err := netlinksafe.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return 0, fmt.Errorf("listing addresses of %s: %w", link.Attrs().Name, err)
	}
	wanted := map[netip.Addr]bool{}
	for _, a := range want {
		wanted[a] = true
	}
	changed := 0
	for _, a := range have {
		p, ok := routes.PrefixOf(a.IPNet)
		if !ok || p.Addr().IsLinkLocalUnicast() {
			continue
		}
		if wanted[p.Addr()] && p.Bits() == p.Addr().BitLen() {
			delete(wanted, p.Addr())
			continue
		}
		a := a
		if err := netlink.AddrDel(link, &a); err != nil {
			return changed, fmt.Errorf("removing old address %s from %s: %w", p, link.Attrs().Name, err)
		}
		changed++
	}
	for _, a := range want {
		if !wanted[a] {
			continue
		}
		addr := &netlink.Addr{IPNet: routes.IPNet(netip.PrefixFrom(a, a.BitLen()))}
		if a.Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(link, addr); err != nil {
			return changed, fmt.Errorf("adding %s to %s: %w", a, link.Attrs().Name, err)
		}
		changed++
	}
	return changed, nil
}
