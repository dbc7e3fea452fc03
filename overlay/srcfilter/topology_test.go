package srcfilter

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/sluice-net/sluice/internal/nettest"
	"github.com/sluice-net/sluice/overlay/vxlan"
)

// fam is one IP family of the test cluster. Host i (1 the node under
// test, 2 a known peer node, 3 an outside host) has underlay address
// underlay(i), pod subnet subnet(i) and, on nodes, a pod at pod(i).
type fam struct {
	name     string
	v6       bool
	underlay func(i int) netip.Addr
	subnet   func(i int) netip.Prefix
	mtu      int
}

func (f fam) pod(i int) netip.Addr {
	a := f.subnet(i).Addr().As16()
	a[15] = 5
	if f.v6 {
		return netip.AddrFrom16(a)
	}
	return netip.AddrFrom4([4]byte(a[12:]))
}

var fams = []fam{
	{"ipv4", false, func(i int) netip.Addr { return netip.MustParseAddr(fmt.Sprintf("192.0.2.%d", i)) },
		func(i int) netip.Prefix { return netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i)) }, 1450},
	{"ipv6", true, func(i int) netip.Addr { return netip.MustParseAddr(fmt.Sprintf("2001:db8::%d", i)) },
		func(i int) netip.Prefix { return netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i)) }, 1430},
}

// host is a namespace on the underlay, optionally with one pod.
type host struct {
	i   int
	ns  ns.NetNS
	pod ns.NetNS
	mac net.HardwareAddr
}

func (h *host) name() string { return nettest.Name(h.ns) }

// lan makes n hosts on one bridged underlay segment (the bridge lives in
// its own namespace), with both families' addresses.
func lan(t testing.TB, f fam, n int) []*host {
	sw := nettest.NewNS(t)
	nettest.Run(t, "ip", "-n", nettest.Name(sw), "link", "add", "br0", "type", "bridge")
	nettest.Run(t, "ip", "-n", nettest.Name(sw), "link", "set", "br0", "up")
	var hosts []*host
	for i := 1; i <= n; i++ {
		h := &host{i: i, ns: nettest.NewNS(t), mac: net.HardwareAddr{0x0e, 0, 0, 0, 0, byte(i)}}
		port := fmt.Sprintf("h%d", i)
		nettest.Run(t, "ip", "-n", nettest.Name(sw), "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", h.name())
		nettest.Run(t, "ip", "-n", nettest.Name(sw), "link", "set", port, "master", "br0", "up")
		bits := map[bool]int{false: 24, true: 64}[f.v6]
		nettest.Run(t, "ip", "-n", h.name(), "addr", "add", fmt.Sprintf("%s/%d", f.underlay(i), bits), "dev", "eth0", "nodad")
		nettest.Run(t, "ip", "-n", h.name(), "link", "set", "eth0", "up")
		hosts = append(hosts, h)
	}
	return hosts
}

// addPod wires a pod namespace to the host as the CNI plugin would: a veth,
// a /32 or /128 route to the pod, the pod's default route via the host.
func addPod(t testing.TB, f fam, h *host) {
	h.pod = nettest.NewNS(t)
	pod, ip := nettest.Name(h.pod), f.pod(h.i)
	nettest.Run(t, "ip", "-n", h.name(), "link", "add", "slpod", "type", "veth", "peer", "name", "eth0", "netns", pod)
	nettest.Run(t, "ip", "-n", h.name(), "link", "set", "slpod", "up")
	nettest.Run(t, "ip", "-n", pod, "link", "set", "eth0", "mtu", fmt.Sprint(f.mtu), "up")
	nettest.Run(t, "ip", "-n", pod, "addr", "add", fmt.Sprintf("%s/%d", ip, ip.BitLen()), "dev", "eth0", "nodad")
	if f.v6 {
		nettest.Run(t, "ip", "-n", h.name(), "addr", "add", "fe80::1/64", "dev", "slpod", "nodad")
		nettest.Run(t, "ip", "-n", pod, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
		nettest.Run(t, "ip", "netns", "exec", h.name(), "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
	} else {
		nettest.Run(t, "ip", "-n", h.name(), "addr", "add", "169.254.1.1/32", "dev", "slpod")
		nettest.Run(t, "ip", "-n", pod, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
		nettest.Run(t, "ip", "-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
		nettest.Run(t, "ip", "netns", "exec", h.name(), "sysctl", "-qw", "net.ipv4.ip_forward=1")
	}
	nettest.Run(t, "ip", "-n", h.name(), "route", "add", fmt.Sprintf("%s/%d", ip, ip.BitLen()), "dev", "slpod")
}

// program writes Sluice's tunnel for host h toward peers with vxlan.Sync.
func program(t testing.TB, f fam, h *host, peers ...*host) {
	nettest.Do(t, h.ns, func() error {
		up, err := netlink.LinkByName("eth0")
		if err != nil {
			return err
		}
		tab := vxlan.Table{Own: f.subnet(h.i), UnderlayIndex: up.Attrs().Index, Device: &vxlan.Device{
			Name: "vx-sluice.1", VNI: 1, Port: 8472, LocalIP: f.underlay(h.i), UnderlayIndex: up.Attrs().Index,
			MTU: f.mtu, MAC: h.mac, VTEPAddr: f.subnet(h.i).Addr()}}
		for _, p := range peers {
			tab.Peers = append(tab.Peers, vxlan.Peer{Node: fmt.Sprint("node-", p.i), Subnet: f.subnet(p.i), PublicIP: f.underlay(p.i), VtepMAC: p.mac})
		}
		ch, err := vxlan.Sync(tab)
		if err == nil && len(ch.Skipped) > 0 {
			err = fmt.Errorf("peers skipped: %v", ch.Skipped)
		}
		return err
	})
}

// handTunnel builds, with ip(8) only, a VXLAN device on host h aimed at
// node `to` (same VNI and port as Sluice's, to's VTEP MAC from its
// annotations), carrying innerSrc as its own address: what anyone on the
// underlay can build.
func handTunnel(t testing.TB, f fam, h, to *host, innerSrc netip.Addr) {
	n := h.name()
	nettest.Run(t, "ip", "-n", n, "link", "add", "vxh", "address", fmt.Sprintf("0e:aa:00:00:00:%02x", h.i), "type", "vxlan",
		"id", "1", "local", f.underlay(h.i).String(), "dev", "eth0", "dstport", "8472", "nolearning")
	nettest.Run(t, "ip", "-n", n, "link", "set", "vxh", "mtu", fmt.Sprint(f.mtu), "up")
	nettest.Run(t, "ip", "-n", n, "addr", "add", fmt.Sprintf("%s/%d", innerSrc, innerSrc.BitLen()), "dev", "vxh", "nodad")
	vtep := f.subnet(to.i).Addr()
	nettest.Run(t, "ip", "-n", n, "neigh", "add", vtep.String(), "lladdr", to.mac.String(), "dev", "vxh", "nud", "permanent")
	nettest.Run(t, "bridge", "-n", n, "fdb", "append", to.mac.String(), "dev", "vxh", "dst", f.underlay(to.i).String(), "self", "permanent")
	nettest.Run(t, "ip", "-n", n, "route", "add", f.subnet(to.i).String(), "via", vtep.String(), "dev", "vxh", "onlink")
}
