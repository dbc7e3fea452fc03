package overlay

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
)

// InterfaceSelection says how to find the underlay interface, with flannel's
// flags: by name or address, by regular expression, or by the route to an
// address; the default route's interface otherwise.
type InterfaceSelection struct {
	Ifaces   []string // names or IP addresses, first match wins
	Regexes  []string
	CanReach string
}

// Underlay is the interface tunnels run over and the node's addresses on it.
type Underlay struct {
	Link netlink.Link
	IP4  netip.Addr // invalid when the interface has none
	IP6  netip.Addr
}

// FindUnderlay picks the underlay interface.
func FindUnderlay(sel InterfaceSelection) (*Underlay, error) {
	links, err := netlinksafe.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing interfaces: %w", err)
	}
	for _, want := range sel.Ifaces {
		if ip, err := netip.ParseAddr(want); err == nil {
			for _, l := range links {
				u, err := underlayOf(l)
				if err == nil && (u.IP4 == ip || u.IP6 == ip) {
					return u, nil
				}
			}
			continue
		}
		for _, l := range links {
			if l.Attrs().Name == want {
				return underlayOf(l)
			}
		}
	}
	if len(sel.Ifaces) > 0 {
		return nil, fmt.Errorf("--iface %v: no such interface or address on this node", sel.Ifaces)
	}
	for _, expr := range sel.Regexes {
		re, err := regexp.Compile(expr)
		if err != nil {
			return nil, fmt.Errorf("--iface-regex %q: %w", expr, err)
		}
		for _, l := range links {
			u, err := underlayOf(l)
			if err != nil {
				continue
			}
			if re.MatchString(l.Attrs().Name) || (u.IP4.IsValid() && re.MatchString(u.IP4.String())) || (u.IP6.IsValid() && re.MatchString(u.IP6.String())) {
				return u, nil
			}
		}
	}
	if len(sel.Regexes) > 0 {
		return nil, fmt.Errorf("--iface-regex %v: no interface or address matches", sel.Regexes)
	}
	if sel.CanReach == "" {
		return defaultRouteUnderlay()
	}
	target := net.ParseIP(sel.CanReach)
	if target == nil {
		return nil, fmt.Errorf("--iface-can-reach %q is not an IP address", sel.CanReach)
	}
	// A route lookup only; nothing is sent.
	routes, err := netlink.RouteGet(target)
	if err != nil || len(routes) == 0 {
		return nil, fmt.Errorf("--iface-can-reach %s: no route: %v", sel.CanReach, err)
	}
	l, err := netlink.LinkByIndex(routes[0].LinkIndex)
	if err != nil {
		return nil, fmt.Errorf("reading interface %d: %w", routes[0].LinkIndex, err)
	}
	return underlayOf(l)
}

func defaultRouteUnderlay() (*Underlay, error) {
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlinksafe.RouteList(nil, fam)
		if err != nil {
			continue
		}
		for _, r := range routes {
			if (r.Dst == nil || r.Dst.IP.IsUnspecified()) && r.LinkIndex > 0 {
				l, err := netlink.LinkByIndex(r.LinkIndex)
				if err == nil {
					return underlayOf(l)
				}
			}
		}
	}
	return nil, fmt.Errorf("no default route to pick the underlay interface from; set --iface")
}

func underlayOf(l netlink.Link) (*Underlay, error) {
	u := &Underlay{Link: l}
	addrs, err := netlinksafe.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("listing addresses of %s: %w", l.Attrs().Name, err)
	}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		if ip.IsLinkLocalUnicast() || ip.IsLoopback() {
			continue
		}
		if ip.Is4() && !u.IP4.IsValid() {
			u.IP4 = ip
		}
		if ip.Is6() && !u.IP6.IsValid() {
			u.IP6 = ip
		}
	}
	if !u.IP4.IsValid() && !u.IP6.IsValid() {
		return nil, fmt.Errorf("interface %s has no usable address", l.Attrs().Name)
	}
	return u, nil
}

// Reachable reports whether the kernel has seen the underlay neighbour at
// ip answer: its neighbour entry is in a confirmed state. It sends nothing.
func Reachable(ip netip.Addr) bool {
	fam := netlink.FAMILY_V4
	if ip.Is6() {
		fam = netlink.FAMILY_V6
	}
	neighs, err := netlink.NeighList(0, fam)
	if err != nil {
		return false
	}
	for _, n := range neighs {
		if a, ok := netip.AddrFromSlice(n.IP); ok && a.Unmap() == ip {
			return n.State&(netlink.NUD_REACHABLE|netlink.NUD_STALE|netlink.NUD_DELAY|netlink.NUD_PROBE|netlink.NUD_PERMANENT) != 0
		}
	}
	return false
}
