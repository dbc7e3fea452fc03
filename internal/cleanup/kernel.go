package cleanup

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/ipset"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/overlay/vxlan"
)

var (
	// podVeth is the host side of a pod veth, as cni.HostVethName makes it.
	podVeth = regexp.MustCompile(`^` + regexp.QuoteMeta(contract.HostVethPrefix) + `[0-9a-f]{11}$`)
	// tunnelDevice is a VXLAN device of the overlay loop.
	tunnelDevice = regexp.MustCompile(`^vx6?-sluice\.[0-9]+$`)
	// wireguardDevice is a WireGuard device: a kernel one, or the
	// persistent TUN device of the userspace implementation.
	wireguardDevice = regexp.MustCompile(`^wg6?-sluice$`)
)

// Kernel removes Sluice's iptables rules and chains, ipsets, links and
// routes from the current network namespace. It tries every kind even when
// one fails, and returns what it removed and every error.
func Kernel() ([]string, error) {
	var removed []string
	var errs []error
	// Rules first: an ipset cannot go while a rule references it.
	for _, step := range []func() ([]string, error){iptablesRules, ipsets, links, routes} {
		r, err := step()
		removed = append(removed, r...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	return removed, errors.Join(errs...)
}

// iptablesRules removes Sluice's chains and the jumps to them in both
// families and both backends: the agent uses one, but a node may have
// switched, and either holding a SLUICE-* chain is a leftover.
func iptablesRules() ([]string, error) {
	var removed []string
	var errs []error
	for _, mode := range []iptables.Mode{iptables.ModeNFT, iptables.ModeLegacy} {
		for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
			r, err := iptables.New(fam, mode)
			if err != nil {
				klog.V(2).InfoS("skipping an iptables backend", "backend", mode, "family", fam, "err", err)
				continue
			}
			save, err := r.Save()
			if err != nil {
				errs = append(errs, err)
				continue
			}
			payloads := removal(save)
			tables := make([]string, 0, len(payloads))
			for t := range payloads {
				tables = append(tables, t)
			}
			sort.Strings(tables)
			for _, table := range tables {
				if err := r.Restore(table, payloads[table]); err != nil {
					errs = append(errs, fmt.Errorf("removing Sluice's rules from %s table %s (IPv%d): %w", mode, table, fam, err))
					continue
				}
				for _, l := range strings.Split(strings.TrimSpace(string(payloads[table])), "\n") {
					if strings.HasPrefix(l, "-X ") || strings.HasPrefix(l, "-D ") {
						removed = append(removed, fmt.Sprintf("iptables-%s IPv%d %s: %s", mode, fam, table, l))
					}
				}
			}
		}
	}
	return removed, errors.Join(errs...)
}

// ipsets destroys the policy loop's sets. Without the ip_set module
// loaded, no set can exist, and listing would fail.
func ipsets() ([]string, error) {
	if _, err := os.Stat("/sys/module/ip_set"); err != nil {
		return nil, nil
	}
	names, err := ipset.Names(ChainPrefix)
	if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	for _, n := range names {
		if err := ipset.Destroy(n); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, "ipset "+n)
	}
	return removed, errors.Join(errs...)
}

// links deletes the tunnel devices (their neighbour and FDB entries go
// with them) and the pod veths (the pod's end and the host's /32 and /128
// routes go with them). The link type is checked too, so another program's
// interface that happens to match a name stays.
func links() ([]string, error) {
	all, err := netlinksafe.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing links: %w", err)
	}
	var removed []string
	var errs []error
	for _, l := range all {
		name := l.Attrs().Name
		ours := tunnelDevice.MatchString(name) && l.Type() == "vxlan" || podVeth.MatchString(name) && l.Type() == "veth" ||
			wireguardDevice.MatchString(name) && (l.Type() == "wireguard" || l.Type() == "tuntap")
		if !ours {
			continue
		}
		if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("deleting link %s: %w", name, err))
			continue
		}
		removed = append(removed, "link "+name)
	}
	return removed, errors.Join(errs...)
}

// routes deletes every route carrying Sluice's protocol number, in every
// table: the blackhole of the node's own subnet, and host-gw and direct
// routes, which live on the underlay device and outlast the tunnel.
func routes() ([]string, error) {
	var removed []string
	var errs []error
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := netlinksafe.RouteListFiltered(fam, &netlink.Route{Protocol: vxlan.RouteProtocol, Table: unix.RT_TABLE_UNSPEC},
			netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		if err != nil {
			errs = append(errs, fmt.Errorf("listing routes: %w", err))
			continue
		}
		for _, r := range rs {
			if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("deleting route %s: %w", r, err))
				continue
			}
			removed = append(removed, fmt.Sprintf("route %s (proto %d)", describe(r), vxlan.RouteProtocol))
		}
	}
	return removed, errors.Join(errs...)
}

func describe(r netlink.Route) string {
	dst := "default"
	if r.Dst != nil {
		dst = r.Dst.String()
	}
	if r.Type == unix.RTN_BLACKHOLE {
		return "blackhole " + dst
	}
	return dst
}
