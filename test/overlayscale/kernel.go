// Package overlayscale measures the overlay at 5,000 nodes: Node objects
// with pod CIDRs and flannel annotations (fake VTEPs, no kubelets) in a
// lab API server, one real agent on a lab node, and flanneld on another
// in the same run.
package overlayscale

import (
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// programmed counts a tunnel device's peers in a node's kernel: routes
// through it, neighbour entries on it, and FDB entries with a remote.
type programmed struct{ routes, neighbours, fdb int }

func (p programmed) min() int { return min(p.routes, p.neighbours, p.fdb) }

func countPeers(netnsPath, device string) (programmed, error) {
	var p programmed
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		link, err := netlink.LinkByName(device)
		if err != nil {
			return nil // not created yet
		}
		idx := link.Attrs().Index
		routes, err := netlink.RouteListFiltered(unix.AF_INET, &netlink.Route{LinkIndex: idx}, netlink.RT_FILTER_OIF)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if r.Dst != nil && r.Gw != nil {
				p.routes++
			}
		}
		neighs, err := netlink.NeighList(idx, unix.AF_INET)
		if err != nil {
			return err
		}
		for _, n := range neighs {
			if len(n.HardwareAddr) > 0 && n.State&netlink.NUD_PERMANENT != 0 {
				p.neighbours++
			}
		}
		fdb, err := netlink.NeighList(idx, unix.AF_BRIDGE)
		if err != nil {
			return err
		}
		for _, n := range fdb {
			if n.IP != nil && !n.IP.IsUnspecified() {
				p.fdb++
			}
		}
		return nil
	})
	return p, err
}

// hasRoute says whether a node's kernel routes a pod subnet.
func hasRoute(netnsPath string, dst *net.IPNet) (bool, error) {
	var found bool
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		routes, err := netlink.RouteListFiltered(unix.AF_INET, &netlink.Route{Dst: dst}, netlink.RT_FILTER_DST)
		found = len(routes) > 0
		return err
	})
	return found, err
}

// rssMiB is a process's resident set.
func rssMiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("no VmRSS for PID %d", pid)
}

// cpuSeconds is a process's user and system CPU time.
func cpuSeconds(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100, nil // USER_HZ
}
