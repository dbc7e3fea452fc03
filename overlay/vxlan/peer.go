package vxlan

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sluice-net/sluice/internal/journal"
	"github.com/sluice-net/sluice/overlay/routes"
)

// SyncPeer programs one peer's route, neighbour and FDB entry, and removes
// those of old (the peer as last programmed; nil for none) that p (nil for
// a peer that is gone) no longer needs. It reads nothing of the other
// peers, neither from the table nor from the kernel: it is the path for one
// Node's change, and Sync, which diffs everything, stays the repair. The
// table gives the device, the own subnet and the routing mode; its Peers
// are ignored, and its device must exist (Sync makes it). A p that cannot
// be programmed comes back in Changes.Skipped, with old's entries removed.
func SyncPeer(t Table, old, p *Peer) (Changes, error) {
	var ch Changes
	fam := family(t.Own.Addr())
	var dev netlink.Link
	if t.Device != nil {
		var err error
		if dev, err = netlink.LinkByName(t.Device.Name); err != nil {
			return ch, fmt.Errorf("reading %s: %w", t.Device.Name, err)
		}
	}
	underlayNets, err := connectedNets(t.UnderlayIndex, fam)
	if err != nil {
		return ch, err
	}
	was, now := peerWant(t, dev, underlayNets, old), peerWant(t, dev, underlayNets, p)
	ch.Skipped = now.skipped
	// As in Sync, the neighbour and FDB entries come before the route that
	// uses them, and go after it.
	if dev != nil {
		if err := setNeighbours(dev, fam, was.neigh, now.neigh, &ch); err != nil {
			return ch, err
		}
		if err := setFDB(dev, was.fdb, now.fdb, &ch); err != nil {
			return ch, err
		}
	}
	for pfx, r := range now.routes {
		if cur, ok := was.routes[pfx]; ok && sameRoute(cur, r) {
			continue
		}
		r := r
		if err := netlink.RouteReplace(&r); err != nil {
			return ch, fmt.Errorf("writing route %s: %w", pfx, err)
		}
		journal.Default.Add("overlay", "route", addOrChange(was.routes, pfx), routes.Describe(r))
		ch.Routes++
	}
	for pfx, r := range was.routes {
		if _, ok := now.routes[pfx]; ok {
			continue
		}
		r := r
		if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, syscall.ESRCH) {
			return ch, fmt.Errorf("removing route %s: %w", pfx, err)
		}
		journal.Default.Add("overlay", "route", "remove", routes.Describe(r))
		ch.Removed++
	}
	if dev != nil {
		return ch, removeEntries(dev, fam, was, now, &ch)
	}
	return ch, nil
}

// peerWant is what one peer (none for nil) asks of the kernel, without the
// table's own blackhole route.
func peerWant(t Table, dev netlink.Link, underlayNets []netip.Prefix, p *Peer) want {
	one := Table{Own: t.Own, DirectRouting: t.DirectRouting, UnderlayIndex: t.UnderlayIndex}
	if p != nil {
		one.Peers = []Peer{*p}
	}
	w := wanted(one, dev, underlayNets)
	delete(w.routes, t.Own)
	return w
}

func setNeighbours(dev netlink.Link, fam int, was, now map[netip.Addr]net.HardwareAddr, ch *Changes) error {
	for ip, mac := range now {
		if cur, ok := was[ip]; ok && cur.String() == mac.String() {
			continue
		}
		n := &netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: fam, State: netlink.NUD_PERMANENT, Type: unix.RTN_UNICAST, IP: ip.AsSlice(), HardwareAddr: mac}
		if err := netlink.NeighSet(n); err != nil {
			return fmt.Errorf("writing neighbour %s -> %s: %w", ip, mac, err)
		}
		journal.Default.Add("overlay", "neighbour", addOrChange(was, ip), fmt.Sprintf("%s lladdr %s dev %s", ip, mac, dev.Attrs().Name))
		ch.Neighbours++
	}
	return nil
}

func setFDB(dev netlink.Link, was, now map[string]netip.Addr, ch *Changes) error {
	for mac, ip := range now {
		cur, had := was[mac]
		if had && cur == ip {
			continue
		}
		hw, _ := net.ParseMAC(mac)
		if had {
			// A node moved to another underlay address: replace, not add.
			_ = netlink.NeighDel(fdbEntry(dev, hw, cur))
		}
		if err := netlink.NeighSet(fdbEntry(dev, hw, ip)); err != nil {
			return fmt.Errorf("writing FDB entry %s -> %s: %w", mac, ip, err)
		}
		journal.Default.Add("overlay", "fdb", addOrChange(was, mac), fmt.Sprintf("%s dst %s dev %s", mac, ip, dev.Attrs().Name))
		ch.FDB++
	}
	return nil
}

// removeEntries removes the neighbour and FDB entries of was that now does
// not have, once the route that used them is gone.
func removeEntries(dev netlink.Link, fam int, was, now want, ch *Changes) error {
	for ip, mac := range was.neigh {
		if _, ok := now.neigh[ip]; ok {
			continue
		}
		n := &netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: fam, State: netlink.NUD_PERMANENT, IP: ip.AsSlice(), HardwareAddr: mac}
		if err := netlink.NeighDel(n); err != nil && !errors.Is(err, syscall.ENOENT) {
			return fmt.Errorf("removing neighbour %s: %w", ip, err)
		}
		journal.Default.Add("overlay", "neighbour", "remove", fmt.Sprintf("%s lladdr %s dev %s", ip, mac, dev.Attrs().Name))
		ch.Removed++
	}
	for mac, ip := range was.fdb {
		if _, ok := now.fdb[mac]; ok {
			continue
		}
		hw, _ := net.ParseMAC(mac)
		if err := netlink.NeighDel(fdbEntry(dev, hw, ip)); err != nil && !errors.Is(err, syscall.ENOENT) {
			return fmt.Errorf("removing FDB entry %s: %w", mac, err)
		}
		journal.Default.Add("overlay", "fdb", "remove", fmt.Sprintf("%s dst %s dev %s", mac, ip, dev.Attrs().Name))
		ch.Removed++
	}
	return nil
}

func fdbEntry(dev netlink.Link, mac net.HardwareAddr, ip netip.Addr) *netlink.Neigh {
	return &netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: syscall.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT, IP: ip.AsSlice(), HardwareAddr: mac}
}

// sameRoute compares two routes that wanted built.
func sameRoute(a, b netlink.Route) bool {
	return a.Type == b.Type && a.LinkIndex == b.LinkIndex && a.Gw.Equal(b.Gw) && a.Flags == b.Flags
}
