package vxlan

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sluice-net/sluice/internal/journal"
	"github.com/sluice-net/sluice/overlay/routes"
)

// RouteProtocol marks the routes Sluice owns; package routes keeps them.
const RouteProtocol = routes.Protocol

// Device is the wanted VXLAN device of one family.
type Device struct {
	Name string
	VNI  int
	Port int
	GBP  bool
	// LocalIP is the node's underlay address of this family; tunnels start
	// there.
	LocalIP netip.Addr
	// UnderlayIndex is the interface that carries the tunnel.
	UnderlayIndex int
	MTU           int
	MAC           net.HardwareAddr
	// VTEPAddr is the node's own subnet address (/32 or /128), which remote
	// nodes route to.
	VTEPAddr netip.Addr
}

// Peer is a remote node.
type Peer struct {
	Node     string
	Subnet   netip.Prefix
	PublicIP netip.Addr
	// VtepMAC is empty for a node that has no VXLAN device (host-gw).
	VtepMAC net.HardwareAddr
}

// Table is the whole wanted overlay state of one family.
type Table struct {
	// Device is nil for the host-gw backend.
	Device *Device
	// Own is the node's pod subnet; it gets a blackhole route so traffic to
	// unassigned local pod IPs never leaves through the default route.
	Own netip.Prefix
	// Peers are the remote nodes with a subnet of this family.
	Peers []Peer
	// DirectRouting routes to peers on the same L2 segment via their node
	// IP instead of the tunnel; host-gw does so for every peer.
	DirectRouting bool
	UnderlayIndex int
}

// Changes counts what Sync had to write or remove, by kind. A restart over
// a correct kernel state counts nothing. Skipped lists the peers Sync could
// not program; they are not changes, and Total does not count them.
type Changes struct {
	Device, Routes, Neighbours, FDB, Removed int
	// Peers counts WireGuard peer entries, which the wireguard backend
	// reports in the same shape; VXLAN has none.
	Peers   int
	Skipped []SkippedPeer
}

// SkippedPeer is a peer that Sync left out, and why. One bad peer never
// stops the others from being programmed: its entries are simply absent
// (and removed if it had some), and the caller reports it.
type SkippedPeer struct {
	Node   string
	Reason string
}

// Total is the number of changes.
func (c Changes) Total() int { return c.Device + c.Routes + c.Neighbours + c.FDB + c.Peers + c.Removed }

func family(a netip.Addr) int { return routes.Family(a) }

// Sync makes the kernel match the table. A peer that cannot be programmed
// (a host-gw peer off this node's L2 segment, a tunnel peer without a VTEP
// MAC) is left out and returned in Changes.Skipped; every other peer is
// programmed. The error is for failures of the kernel or of the table's own
// device, which affect every peer alike.
func Sync(t Table) (Changes, error) {
	var ch Changes
	fam := family(t.Own.Addr())
	var dev netlink.Link
	if t.Device != nil {
		var changed bool
		var err error
		dev, changed, err = EnsureDevice(*t.Device)
		if err != nil {
			return ch, err
		}
		if changed {
			ch.Device++
		}
	}
	underlayNets, err := connectedNets(t.UnderlayIndex, fam)
	if err != nil {
		return ch, err
	}
	w := wanted(t, dev, underlayNets)
	ch.Skipped = w.skipped

	// Order matters for the first packet: the neighbour and FDB entries
	// must exist before the route that uses them.
	if dev != nil {
		n, removed, err := syncNeighbours(dev, fam, w.neigh)
		ch.Neighbours, ch.Removed = ch.Neighbours+n, ch.Removed+removed
		if err != nil {
			return ch, err
		}
		n, removed, err = syncFDB(dev, w.fdb)
		ch.FDB, ch.Removed = ch.FDB+n, ch.Removed+removed
		if err != nil {
			return ch, err
		}
	}
	n, removed, err := routes.Sync(fam, w.routes)
	ch.Routes, ch.Removed = ch.Routes+n, ch.Removed+removed
	return ch, err
}

// want is the kernel state a table asks for.
type want struct {
	routes  map[netip.Prefix]netlink.Route
	neigh   map[netip.Addr]net.HardwareAddr
	fdb     map[string]netip.Addr // MAC -> underlay IP
	skipped []SkippedPeer
}

// wanted computes the entries of every peer that can be programmed, and
// the reason for each one that cannot.
func wanted(t Table, dev netlink.Link, underlayNets []netip.Prefix) want {
	fam := family(t.Own.Addr())
	w := want{routes: map[netip.Prefix]netlink.Route{}, neigh: map[netip.Addr]net.HardwareAddr{}, fdb: map[string]netip.Addr{}}
	w.routes[t.Own] = routes.Blackhole(t.Own)
	for _, p := range t.Peers {
		onL2 := onLink(underlayNets, p.PublicIP)
		switch {
		case dev == nil && !onL2:
			w.skip(p, fmt.Sprintf("host-gw: node IP %s is not on this node's L2 segment %v; use the vxlan backend", p.PublicIP, underlayNets))
		case dev == nil || (t.DirectRouting && onL2):
			w.routes[p.Subnet] = netlink.Route{Dst: routes.IPNet(p.Subnet), Gw: p.PublicIP.AsSlice(), LinkIndex: t.UnderlayIndex, Protocol: RouteProtocol, Family: fam}
		case len(p.VtepMAC) == 0:
			why := "DirectRouting is off"
			if t.DirectRouting {
				why = fmt.Sprintf("its IP %s is not on this node's L2 segment %v", p.PublicIP, underlayNets)
			}
			w.skip(p, "node has no VTEP MAC (its backend is not vxlan), so no tunnel reaches it, and no direct route either: "+why)
		default:
			vtep := p.Subnet.Addr()
			w.neigh[vtep] = p.VtepMAC
			w.fdb[p.VtepMAC.String()] = p.PublicIP
			w.routes[p.Subnet] = netlink.Route{Dst: routes.IPNet(p.Subnet), Gw: vtep.AsSlice(), LinkIndex: dev.Attrs().Index,
				Flags: int(netlink.FLAG_ONLINK), Protocol: RouteProtocol, Family: fam}
		}
	}
	return w
}

func (w *want) skip(p Peer, reason string) {
	w.skipped = append(w.skipped, SkippedPeer{Node: p.Node, Reason: reason})
}

func connectedNets(index, fam int) ([]netip.Prefix, error) {
	link, err := netlink.LinkByIndex(index)
	if err != nil {
		return nil, fmt.Errorf("reading underlay interface %d: %w", index, err)
	}
	addrs, err := netlinksafe.AddrList(link, fam)
	if err != nil {
		return nil, fmt.Errorf("reading addresses of %s: %w", link.Attrs().Name, err)
	}
	var nets []netip.Prefix
	for _, a := range addrs {
		if p, ok := routes.PrefixOf(a.IPNet); ok && !p.Addr().IsLinkLocalUnicast() {
			nets = append(nets, p.Masked())
		}
	}
	return nets, nil
}

func onLink(nets []netip.Prefix, ip netip.Addr) bool {
	for _, n := range nets {
		if n.Contains(ip) {
			return true
		}
	}
	return false
}

func syncNeighbours(dev netlink.Link, fam int, want map[netip.Addr]net.HardwareAddr) (written, removed int, err error) {
	have, err := neighList(dev.Attrs().Index, fam)
	if err != nil {
		return 0, 0, fmt.Errorf("listing neighbours of %s: %w", dev.Attrs().Name, err)
	}
	haveBy := map[netip.Addr]netlink.Neigh{}
	for _, n := range have {
		if a, ok := netip.AddrFromSlice(n.IP); ok && n.State&netlink.NUD_PERMANENT != 0 {
			haveBy[a.Unmap()] = n
		}
	}
	for ip, mac := range want {
		if cur, ok := haveBy[ip]; ok && cur.HardwareAddr.String() == mac.String() {
			continue
		}
		n := &netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: fam, State: netlink.NUD_PERMANENT, Type: unix.RTN_UNICAST, IP: ip.AsSlice(), HardwareAddr: mac}
		if err := netlink.NeighSet(n); err != nil {
			return written, removed, fmt.Errorf("writing neighbour %s -> %s: %w", ip, mac, err)
		}
		journal.Default.Add("overlay", "neighbour", addOrChange(haveBy, ip), fmt.Sprintf("%s lladdr %s dev %s", ip, mac, dev.Attrs().Name))
		written++
	}
	for ip, n := range haveBy {
		if _, ok := want[ip]; ok {
			continue
		}
		n := n
		if err := netlink.NeighDel(&n); err != nil && !errors.Is(err, syscall.ENOENT) {
			return written, removed, fmt.Errorf("removing stale neighbour %s: %w", ip, err)
		}
		journal.Default.Add("overlay", "neighbour", "remove", fmt.Sprintf("%s lladdr %s dev %s", ip, n.HardwareAddr, dev.Attrs().Name))
		removed++
	}
	return written, removed, nil
}

func syncFDB(dev netlink.Link, want map[string]netip.Addr) (written, removed int, err error) {
	have, err := neighList(dev.Attrs().Index, syscall.AF_BRIDGE)
	if err != nil {
		return 0, 0, fmt.Errorf("listing FDB of %s: %w", dev.Attrs().Name, err)
	}
	haveBy := map[string]netlink.Neigh{}
	for _, n := range have {
		if n.State&netlink.NUD_PERMANENT != 0 && len(n.IP) > 0 {
			haveBy[n.HardwareAddr.String()] = n
		}
	}
	for mac, ip := range want {
		if cur, ok := haveBy[mac]; ok && cur.IP.Equal(ip.AsSlice()) {
			continue
		}
		hw, _ := net.ParseMAC(mac)
		if cur, ok := haveBy[mac]; ok {
			// A node moved to another underlay address: replace, not add.
			_ = netlink.NeighDel(&cur)
		}
		n := &netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: syscall.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT, IP: ip.AsSlice(), HardwareAddr: hw}
		if err := netlink.NeighSet(n); err != nil {
			return written, removed, fmt.Errorf("writing FDB entry %s -> %s: %w", mac, ip, err)
		}
		journal.Default.Add("overlay", "fdb", addOrChange(haveBy, mac), fmt.Sprintf("%s dst %s dev %s", mac, ip, dev.Attrs().Name))
		written++
	}
	for mac, n := range haveBy {
		if _, ok := want[mac]; ok {
			continue
		}
		n := n
		if err := netlink.NeighDel(&n); err != nil && !errors.Is(err, syscall.ENOENT) {
			return written, removed, fmt.Errorf("removing stale FDB entry %s: %w", mac, err)
		}
		journal.Default.Add("overlay", "fdb", "remove", fmt.Sprintf("%s dst %s dev %s", mac, n.IP, dev.Attrs().Name))
		removed++
	}
	return written, removed, nil
}

// neighList retries a dump that the kernel interrupted, rather than trusting
// a partial list.
func neighList(index, fam int) ([]netlink.Neigh, error) {
	var err error
	for i := 0; i < 5; i++ {
		var ns []netlink.Neigh
		ns, err = netlink.NeighList(index, fam)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return ns, err
		}
	}
	return nil, err
}

// EnsureDevice creates the device, or fixes it, and reports whether it had
// to change anything. Settings that the kernel cannot change in place (VNI,
// port, local address, underlay, learning, GBP) make it recreate the
// device; Sync then replays its entries.
func EnsureDevice(d Device) (*netlink.Vxlan, bool, error) {
	recreated := false
	link, err := netlink.LinkByName(d.Name)
	if err == nil {
		cur, ok := link.(*netlink.Vxlan)
		if !ok || !compatible(cur, d) {
			if err := netlink.LinkDel(link); err != nil {
				return nil, false, fmt.Errorf("removing %s with outdated settings: %w", d.Name, err)
			}
			link = nil
		}
	} else {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			return nil, false, fmt.Errorf("reading %s: %w", d.Name, err)
		}
		link = nil
	}
	if link == nil {
		v := &netlink.Vxlan{
			LinkAttrs:    netlink.LinkAttrs{Name: d.Name, MTU: d.MTU, HardwareAddr: d.MAC},
			VxlanId:      d.VNI,
			VtepDevIndex: d.UnderlayIndex,
			SrcAddr:      d.LocalIP.AsSlice(),
			Port:         d.Port,
			Learning:     false,
			GBP:          d.GBP,
		}
		if err := netlink.LinkAdd(v); err != nil {
			return nil, false, fmt.Errorf("creating VXLAN device %s: %w", d.Name, err)
		}
		recreated = true
		if link, err = netlink.LinkByName(d.Name); err != nil {
			return nil, false, fmt.Errorf("reading new %s: %w", d.Name, err)
		}
	}
	v := link.(*netlink.Vxlan)
	changed := recreated
	if v.Attrs().MTU != d.MTU {
		if err := netlink.LinkSetMTU(v, d.MTU); err != nil {
			return nil, false, fmt.Errorf("setting MTU of %s: %w", d.Name, err)
		}
		changed = true
	}
	if v.Attrs().HardwareAddr.String() != d.MAC.String() {
		if err := netlink.LinkSetHardwareAddr(v, d.MAC); err != nil {
			return nil, false, fmt.Errorf("setting MAC of %s: %w", d.Name, err)
		}
		changed = true
	}
	added, err := ensureAddr(v, d.VTEPAddr)
	if err != nil {
		return nil, false, err
	}
	changed = changed || added
	if v.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(v); err != nil {
			return nil, false, fmt.Errorf("bringing up %s: %w", d.Name, err)
		}
		changed = true
	}
	return v, changed, nil
}

func compatible(cur *netlink.Vxlan, d Device) bool {
	return cur.VxlanId == d.VNI && cur.Port == d.Port && cur.SrcAddr.Equal(d.LocalIP.AsSlice()) &&
		cur.VtepDevIndex == d.UnderlayIndex && !cur.Learning && cur.GBP == d.GBP
}

// ensureAddr gives the device exactly one global address of the family: the
// VTEP address. Traffic from the node to remote pods then leaves with it as
// its source, which is inside the cluster network and needs no NAT.
func ensureAddr(link netlink.Link, want netip.Addr) (bool, error) {
	fam := family(want)
	addrs, err := netlinksafe.AddrList(link, fam)
	if err != nil {
		return false, fmt.Errorf("listing addresses of %s: %w", link.Attrs().Name, err)
	}
	found := false
	for _, a := range addrs {
		p, ok := routes.PrefixOf(a.IPNet)
		if !ok || p.Addr().IsLinkLocalUnicast() {
			continue
		}
		if p.Addr() == want && p.Bits() == want.BitLen() {
			found = true
			continue
		}
		a := a
		if err := netlink.AddrDel(link, &a); err != nil {
			return false, fmt.Errorf("removing old address %s from %s: %w", p, link.Attrs().Name, err)
		}
	}
	if found {
		return false, nil
	}
	addr := &netlink.Addr{IPNet: routes.IPNet(netip.PrefixFrom(want, want.BitLen()))}
	if want.Is6() {
		addr.Flags = unix.IFA_F_NODAD
	}
	if err := netlink.AddrAdd(link, addr); err != nil {
		return false, fmt.Errorf("adding %s to %s: %w", want, link.Attrs().Name, err)
	}
	return true, nil
}

// Remove deletes the device (with its neighbours and FDB) and every route
// Sluice owns in that family.
func Remove(name string, fam int) error {
	if link, err := netlink.LinkByName(name); err == nil {
		if err := netlink.LinkDel(link); err != nil {
			return fmt.Errorf("removing %s: %w", name, err)
		}
	}
	_, _, err := routes.Sync(fam, nil)
	return err
}

// TXChecksumOffload reports whether TX checksum offload is on.
func TXChecksumOffload(dev string) (bool, error) {
	out, err := exec.Command("ethtool", "-k", dev).CombinedOutput()
	if err != nil {
		return false, fmt.Errorf("ethtool -k %s: %w: %s", dev, err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(l, "tx-checksumming: "); ok {
			return strings.HasPrefix(v, "on"), nil
		}
	}
	return false, fmt.Errorf("ethtool -k %s: no tx-checksumming line", dev)
}

// SetTXChecksumOffload turns TX checksum offload on or off.
func SetTXChecksumOffload(dev string, on bool) error {
	v := "off"
	if on {
		v = "on"
	}
	if out, err := exec.Command("ethtool", "-K", dev, "tx", v).CombinedOutput(); err != nil {
		return fmt.Errorf("ethtool -K %s tx %s: %w: %s", dev, v, err, out)
	}
	return nil
}

// addOrChange says whether a write replaced an entry the kernel had.
func addOrChange[K comparable, V any](have map[K]V, k K) string {
	if _, ok := have[k]; ok {
		return "change"
	}
	return "add"
}
