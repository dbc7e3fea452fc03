package routes

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sluice-net/sluice/internal/journal"
)

// Protocol marks the routes Sluice owns (see /etc/iproute2/rt_protos; the
// number is otherwise unused).
const Protocol netlink.RouteProtocol = 98

// Family is the netlink family of an address.
func Family(a netip.Addr) int {
	if a.Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

// Blackhole is the route that keeps traffic to a prefix from leaving
// through a less specific route (the default route): for the node's own
// pod subnet, traffic to unassigned pod IPs.
func Blackhole(p netip.Prefix) netlink.Route {
	return netlink.Route{Dst: IPNet(p), Type: unix.RTN_BLACKHOLE, Protocol: Protocol, Family: Family(p.Addr())}
}

// IPNet converts a prefix for netlink.
func IPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// PrefixOf converts a netlink destination back.
func PrefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), ones), true
}

// Sync makes Sluice's routes of one family in the main table exactly want,
// and returns how many it wrote and removed.
func Sync(fam int, want map[netip.Prefix]netlink.Route) (written, removed int, err error) {
	have, err := netlinksafe.RouteListFiltered(fam, &netlink.Route{Protocol: Protocol, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return 0, 0, fmt.Errorf("listing routes: %w", err)
	}
	haveBy := map[netip.Prefix]netlink.Route{}
	for _, r := range have {
		if p, ok := PrefixOf(r.Dst); ok {
			haveBy[p] = r
		}
	}
	for p, r := range want {
		if cur, ok := haveBy[p]; ok && same(cur, r) {
			continue
		}
		r := r
		if err := netlink.RouteReplace(&r); err != nil {
			return written, removed, fmt.Errorf("writing route %s: %w", p, err)
		}
		action := "add"
		if _, ok := haveBy[p]; ok {
			action = "change"
		}
		journal.Default.Add("overlay", "route", action, Describe(r))
		written++
	}
	for p, r := range haveBy {
		if _, ok := want[p]; ok {
			continue
		}
		r := r
		if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, syscall.ESRCH) {
			return written, removed, fmt.Errorf("removing stale route %s: %w", p, err)
		}
		journal.Default.Add("overlay", "route", "remove", Describe(r))
		removed++
	}
	return written, removed, nil
}

func same(a, b netlink.Route) bool {
	if routeType(a) == unix.RTN_BLACKHOLE && routeType(b) == unix.RTN_BLACKHOLE {
		return true // IPv6 reports lo as the blackhole's device
	}
	return routeType(a) == routeType(b) && a.LinkIndex == b.LinkIndex && a.Gw.Equal(b.Gw) &&
		(a.Flags&int(netlink.FLAG_ONLINK)) == (b.Flags&int(netlink.FLAG_ONLINK))
}

// routeType treats an unset type as unicast, which is what the kernel
// reports for it.
func routeType(r netlink.Route) int {
	if r.Type == 0 {
		return unix.RTN_UNICAST
	}
	return r.Type
}

// Describe prints a route as ip route does, for the journal.
func Describe(r netlink.Route) string {
	out := "?"
	if p, ok := PrefixOf(r.Dst); ok {
		out = p.String()
	}
	if routeType(r) == unix.RTN_BLACKHOLE {
		return "blackhole " + out
	}
	if r.Gw != nil {
		out += " via " + r.Gw.String()
	}
	if link, err := netlink.LinkByIndex(r.LinkIndex); err == nil {
		out += " dev " + link.Attrs().Name
	}
	if r.Flags&int(netlink.FLAG_ONLINK) != 0 {
		out += " onlink"
	}
	return out
}
