package cni

import (
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ip"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/sluice-net/sluice/internal/contract"
)

// The pod's gateway. Nothing owns 169.254.1.1: the host answers ARP for it
// with proxy ARP on the veth. For IPv6, the gateway is the host veth's
// link-local address, fixed by giving the host veth a fixed MAC.
var (
	gatewayV4   = net.IPv4(169, 254, 1, 1)
	hostVethMAC = net.HardwareAddr{0xee, 0xee, 0xee, 0xee, 0xee, 0xee}
	gatewayV6   = net.ParseIP("fe80::ecee:eeff:feee:eeee")
)

// HostVethName is derived from the pod's namespace and name (or the
// container ID without them): "sl" and 11 hex characters, 13 in all.
func HostVethName(podNamespace, podName, containerID string) string {
	key := containerID
	if podNamespace != "" && podName != "" {
		key = podNamespace + "." + podName
	}
	h := sha1.Sum([]byte(key))
	return contract.HostVethPrefix + hex.EncodeToString(h[:])[:11]
}

// The host veth's alias records the sandbox that owns it: "sluice:" and the
// container ID. Its name comes from the pod's namespace and name, so every
// sandbox of one pod gets the same name; when a runtime replaces a pod's
// sandbox and then retries the DEL of the old one (containerd does), DEL
// must leave the current sandbox's veth alone. Calico's plugin skips such a
// "DEL for an old sandbox of a running pod" the same way.
const ownerAliasPrefix = "sluice:"

func ownerAlias(containerID string) string { return ownerAliasPrefix + containerID }

// vethOwner returns the container ID that owns the host veth, "" if the
// veth records none (made by an older plugin), and whether it exists.
func vethOwner(hostVeth string) (owner string, exists bool) {
	l, err := netlinksafe.LinkByName(hostVeth)
	if err != nil {
		return "", false
	}
	owner, _ = strings.CutPrefix(l.Attrs().Alias, ownerAliasPrefix)
	return owner, true
}

// wire creates the veth pair and configures both ends for the IPs in res.
// The pair is made with one netlink call from the host side: the pod end is
// created straight inside the pod's namespace, and the host end gets its
// fixed MAC at birth, so its link-local address (the pod's IPv6 gateway) is
// right from the start.
func wire(netns ns.NetNS, containerID, ifName, hostVeth string, mtu int, res *current.Result) (hostIface, contIface *current.Interface, err error) {
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: hostVeth, MTU: mtu, HardwareAddr: hostVethMAC},
		PeerName:      ifName,
		PeerMTU:       uint32(mtu),
		PeerNamespace: netlink.NsFd(int(netns.Fd())),
	}
	err = netlink.LinkAdd(veth)
	if errors.Is(err, unix.EEXIST) {
		// A leftover of an earlier sandbox of the same pod holds the name
		// (or of this one, from an ADD that failed half-way): the sandbox
		// being added is the pod's current one, so it takes the name.
		if owner, _ := vethOwner(hostVeth); owner != containerID {
			fmt.Fprintf(os.Stderr, "sluice: %s: replacing the host veth %s of the pod's earlier sandbox %q\n", containerID, hostVeth, owner)
		}
		if l, lerr := netlinksafe.LinkByName(hostVeth); lerr == nil {
			_ = netlink.LinkDel(l)
		}
		err = netlink.LinkAdd(veth)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("creating veth pair %s/%s: %w", hostVeth, ifName, err)
	}
	// The kernel takes no alias in the message that creates a link.
	if l, err := netlinksafe.LinkByName(hostVeth); err != nil {
		return nil, nil, err
	} else if err := netlink.LinkSetAlias(l, ownerAlias(containerID)); err != nil {
		return nil, nil, fmt.Errorf("recording the owner of %s: %w", hostVeth, err)
	}
	contIface = &current.Interface{Name: ifName, Sandbox: netns.Path()}
	err = netns.Do(func(ns.NetNS) error {
		mac, err := configureContainer(ifName, res)
		contIface.Mac = mac
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	if err := configureHost(hostVeth, res); err != nil {
		return nil, nil, err
	}
	return &current.Interface{Name: hostVeth, Mac: hostVethMAC.String()}, contIface, nil
}

func configureContainer(ifName string, res *current.Result) (string, error) {
	link, err := netlinksafe.LinkByName(ifName)
	if err != nil {
		return "", err
	}
	hasV6 := false
	for _, ipc := range res.IPs {
		addr := &netlink.Addr{IPNet: hostPrefix(ipc.Address.IP)}
		if ipc.Address.IP.To4() == nil {
			hasV6 = true
			// The address is unique by IPAM; waiting for duplicate address
			// detection would only delay the pod's first packet.
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := netlink.AddrAdd(link, addr); err != nil {
			return "", fmt.Errorf("adding %s to %s: %w", addr.IPNet, ifName, err)
		}
	}
	if hasV6 {
		_ = writeSysctl("net/ipv6/conf/"+ifName+"/accept_dad", "0")
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return "", fmt.Errorf("bringing up %s: %w", ifName, err)
	}
	for _, ipc := range res.IPs {
		if ipc.Address.IP.To4() != nil {
			if err := netlink.RouteReplace(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: hostPrefix(gatewayV4), Scope: netlink.SCOPE_LINK}); err != nil {
				return "", fmt.Errorf("adding the route to the gateway: %w", err)
			}
			if err := netlink.RouteReplace(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: gatewayV4}); err != nil {
				return "", fmt.Errorf("adding the default route: %w", err)
			}
		} else {
			if err := netlink.RouteReplace(&netlink.Route{LinkIndex: link.Attrs().Index, Gw: gatewayV6, Dst: &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}}); err != nil {
				return "", fmt.Errorf("adding the IPv6 default route: %w", err)
			}
		}
	}
	return link.Attrs().HardwareAddr.String(), nil
}

func configureHost(hostVeth string, res *current.Result) error {
	link, err := netlinksafe.LinkByName(hostVeth)
	if err != nil {
		return err
	}
	hasV6 := false
	for _, ipc := range res.IPs {
		hasV6 = hasV6 || ipc.Address.IP.To4() == nil
	}
	for k, v := range hostSysctls(hostVeth) {
		if strings.Contains(k, "ipv6") && !hasV6 {
			continue
		}
		if err := writeSysctl(k, v); err != nil && !(strings.Contains(k, "ipv6") && errors.Is(err, os.ErrNotExist)) {
			return err
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bringing up %s: %w", hostVeth, err)
	}
	for _, ipc := range res.IPs {
		r := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: hostPrefix(ipc.Address.IP), Scope: netlink.SCOPE_LINK}
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("adding the route to %s via %s: %w", ipc.Address.IP, hostVeth, err)
		}
	}
	return nil
}

// hostSysctls are the settings of the host veth: proxy ARP answers the pod's
// ARP for its gateway at once; forwarding lets the node route for it.
func hostSysctls(veth string) map[string]string {
	return map[string]string{
		"net/ipv4/conf/" + veth + "/proxy_arp":    "1",
		"net/ipv4/neigh/" + veth + "/proxy_delay": "0",
		"net/ipv4/conf/" + veth + "/forwarding":   "1",
		"net/ipv6/conf/" + veth + "/forwarding":   "1",
		"net/ipv6/conf/" + veth + "/accept_ra":    "0",
		// The link-local address is the pod's IPv6 gateway; duplicate
		// address detection would keep it unusable for a second.
		"net/ipv6/conf/" + veth + "/accept_dad":   "0",
		"net/ipv6/conf/" + veth + "/disable_ipv6": "0",
	}
}

func writeSysctl(key, value string) error {
	if err := os.WriteFile("/proc/sys/"+key, []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", strings.ReplaceAll(key, "/", "."), value, err)
	}
	return nil
}

func readSysctl(key string) (string, error) {
	b, err := os.ReadFile("/proc/sys/" + key)
	return strings.TrimSpace(string(b)), err
}

func hostPrefix(a net.IP) *net.IPNet {
	if v4 := a.To4(); v4 != nil {
		return &net.IPNet{IP: v4, Mask: net.CIDRMask(32, 32)}
	}
	return &net.IPNet{IP: a, Mask: net.CIDRMask(128, 128)}
}

// unwire deletes the host veth of containerID, which takes the pod end and
// the host routes with it, and the pod end in netnsPath if it is still
// there. A missing veth is not an error: DEL must be idempotent. A veth
// that another sandbox owns is left alone (see ownerAliasPrefix); a veth
// with no owner recorded is deleted, as before owners were recorded.
func unwire(netnsPath, containerID, ifName, hostVeth string) error {
	if owner, exists := vethOwner(hostVeth); exists && owner != "" && owner != containerID {
		fmt.Fprintf(os.Stderr, "sluice: %s: DEL of an old sandbox; the host veth %s belongs to the pod's current sandbox %s and stays\n", containerID, hostVeth, owner)
	} else if l, err := netlinksafe.LinkByName(hostVeth); err == nil {
		if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("deleting %s: %w", hostVeth, err)
		}
	}
	if netnsPath == "" {
		return nil
	}
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		if _, err := ip.DelLinkByNameAddr(ifName); err != nil && !errors.Is(err, ip.ErrLinkNotFound) {
			return err
		}
		return nil
	})
	var nsErr ns.NSPathNotExistErr
	if errors.As(err, &nsErr) {
		return nil
	}
	return err
}

// check compares the live wiring with the result ADD returned, and says
// what drifted.
func check(netns ns.NetNS, containerID, ifName, hostVeth string, mtu int, res *current.Result) error {
	var problems []string
	link, err := netlinksafe.LinkByName(hostVeth)
	if err != nil {
		return fmt.Errorf("host veth %s is missing", hostVeth)
	}
	if owner, _ := strings.CutPrefix(link.Attrs().Alias, ownerAliasPrefix); owner != containerID {
		problems = append(problems, fmt.Sprintf("host veth %s belongs to sandbox %q", hostVeth, owner))
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		problems = append(problems, hostVeth+" is down")
	}
	if link.Attrs().MTU != mtu {
		problems = append(problems, fmt.Sprintf("%s has MTU %d, want %d", hostVeth, link.Attrs().MTU, mtu))
	}
	hasV6 := false
	for _, ipc := range res.IPs {
		hasV6 = hasV6 || ipc.Address.IP.To4() == nil
	}
	for k, want := range hostSysctls(hostVeth) {
		if strings.Contains(k, "ipv6") && !hasV6 {
			continue
		}
		if got, err := readSysctl(k); err == nil && got != want {
			problems = append(problems, fmt.Sprintf("sysctl %s is %s, want %s", strings.ReplaceAll(k, "/", "."), got, want))
		}
	}
	routes, err := netlinksafe.RouteList(link, netlink.FAMILY_ALL)
	if err != nil {
		return err
	}
	for _, ipc := range res.IPs {
		if !hasRoute(routes, hostPrefix(ipc.Address.IP), nil) {
			problems = append(problems, fmt.Sprintf("host route to %s via %s is missing", ipc.Address.IP, hostVeth))
		}
	}
	err = netns.Do(func(ns.NetNS) error {
		l, err := netlinksafe.LinkByName(ifName)
		if err != nil {
			problems = append(problems, ifName+" is missing in the pod")
			return nil
		}
		if l.Attrs().MTU != mtu {
			problems = append(problems, fmt.Sprintf("pod %s has MTU %d, want %d", ifName, l.Attrs().MTU, mtu))
		}
		addrs, err := netlinksafe.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		routes, err := netlinksafe.RouteList(l, netlink.FAMILY_ALL)
		if err != nil {
			return err
		}
		for _, ipc := range res.IPs {
			found := false
			for _, a := range addrs {
				if a.IP.Equal(ipc.Address.IP) {
					found = true
				}
			}
			if !found {
				problems = append(problems, fmt.Sprintf("pod address %s is missing", ipc.Address.IP))
			}
			gw := gatewayV6
			if ipc.Address.IP.To4() != nil {
				gw = gatewayV4
				if !hasRoute(routes, hostPrefix(gatewayV4), nil) {
					problems = append(problems, "pod route to 169.254.1.1 is missing")
				}
			}
			if !hasRoute(routes, nil, gw) {
				problems = append(problems, fmt.Sprintf("pod default route via %s is missing", gw))
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

func hasRoute(routes []netlink.Route, dst *net.IPNet, gw net.IP) bool {
	for _, r := range routes {
		if dst != nil && r.Dst != nil && r.Dst.String() == dst.String() {
			return true
		}
		if gw != nil && r.Gw != nil && r.Gw.Equal(gw) && (r.Dst == nil || r.Dst.IP.IsUnspecified()) {
			return true
		}
	}
	return false
}
