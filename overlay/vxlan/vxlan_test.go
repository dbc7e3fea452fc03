package vxlan

import (
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/sluice-net/sluice/internal/nettest"
)

// node is a test node: a namespace on a veth underlay with a "pod" address
// inside its subnet.
type node struct {
	netns  ns.NetNS
	ip     netip.Addr
	subnet netip.Prefix
	podIP  netip.Addr
	mac    net.HardwareAddr
}

type testFamily struct {
	name                 string
	underlayA, underlayB string
	subnetA, subnetB     string
	bits                 int
}

var families = []testFamily{
	{"ipv4", "192.0.2.1", "192.0.2.2", "10.244.1.0/24", "10.244.2.0/24", 24},
	{"ipv6", "2001:db8::1", "2001:db8::2", "fd00:10:244:1::/64", "fd00:10:244:2::/64", 64},
}

func twoNodes(t *testing.T, f testFamily) (a, b *node) {
	t.Helper()
	mk := func(ip, subnet string, mac string) *node {
		n := &node{netns: nettest.NewNS(t), ip: netip.MustParseAddr(ip), subnet: netip.MustParsePrefix(subnet)}
		n.mac, _ = net.ParseMAC(mac)
		n.podIP = n.subnet.Addr().Next().Next()
		return n
	}
	a = mk(f.underlayA, f.subnetA, "0e:00:00:00:00:0a")
	b = mk(f.underlayB, f.subnetB, "0e:00:00:00:00:0b")
	an, bn := nettest.Name(a.netns), nettest.Name(b.netns)
	nettest.Run(t, "ip", "-n", an, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", bn)
	for _, n := range []*node{a, b} {
		name := nettest.Name(n.netns)
		nettest.Run(t, "ip", "-n", name, "addr", "add", fmt.Sprintf("%s/%d", n.ip, map[bool]int{true: 24, false: 64}[n.ip.Is4()]), "dev", "eth0", "nodad")
		nettest.Run(t, "ip", "-n", name, "link", "set", "eth0", "up")
		// The kernel has no dummy interfaces; a host address on lo stands
		// in for a pod.
		nettest.Run(t, "ip", "-n", name, "addr", "add", fmt.Sprintf("%s/%d", n.podIP, n.podIP.BitLen()), "dev", "lo", "nodad")
	}
	return a, b
}

func (n *node) table(peer *node, direct bool) Table {
	var idx int
	_ = n.netns.Do(func(ns.NetNS) error {
		l, err := netlink.LinkByName("eth0")
		if err == nil {
			idx = l.Attrs().Index
		}
		return err
	})
	name, mtu := "vx-sluice.1", 1450
	if n.ip.Is6() {
		name, mtu = "vx6-sluice.1", 1430
	}
	t := Table{
		Device:        &Device{Name: name, VNI: 1, Port: 8472, LocalIP: n.ip, UnderlayIndex: idx, MTU: mtu, MAC: n.mac, VTEPAddr: n.subnet.Addr()},
		Own:           n.subnet,
		DirectRouting: direct,
		UnderlayIndex: idx,
	}
	if peer != nil {
		t.Peers = []Peer{{Node: "peer", Subnet: peer.subnet, PublicIP: peer.ip, VtepMAC: peer.mac}}
	}
	return t
}

func (n *node) sync(t *testing.T, tab Table) Changes {
	t.Helper()
	var ch Changes
	nettest.Do(t, n.netns, func() error {
		var err error
		ch, err = Sync(tab)
		return err
	})
	return ch
}

// reach checks a TCP connection from a's node to b's pod address.
func reach(t *testing.T, a, b *node) error {
	t.Helper()
	var ln net.Listener
	nettest.Do(t, b.netns, func() error {
		var err error
		ln, err = net.Listen("tcp", net.JoinHostPort(b.podIP.String(), "7000"))
		return err
	})
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	return a.netns.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 2)
		c.SetDeadline(time.Now().Add(2 * time.Second))
		_, err = c.Read(buf)
		return err
	})
}

func ipOut(t *testing.T, n *node, args ...string) string {
	return nettest.Run(t, "ip", append([]string{"-n", nettest.Name(n.netns)}, args...)...)
}

func TestTunnelEntriesAndTraffic(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			a, b := twoNodes(t, f)
			if ch := a.sync(t, a.table(b, false)); ch.Device != 1 || ch.Routes != 2 || ch.Neighbours != 1 || ch.FDB != 1 {
				t.Errorf("first sync changes = %+v", ch)
			}
			b.sync(t, b.table(a, false))
			dev := a.table(b, false).Device.Name
			fam := "-4"
			if f.name == "ipv6" {
				fam = "-6"
			}
			neigh := ipOut(t, a, fam, "neigh", "show", "dev", dev)
			if !strings.Contains(neigh, b.subnet.Addr().String()+" lladdr "+b.mac.String()) || !strings.Contains(neigh, "PERMANENT") {
				t.Errorf("neighbour entry missing:\n%s", neigh)
			}
			fdb := nettest.Run(t, "bridge", "-n", nettest.Name(a.netns), "fdb", "show", "dev", dev)
			if !strings.Contains(fdb, b.mac.String()+" dst "+b.ip.String()) || !strings.Contains(fdb, "permanent") {
				t.Errorf("FDB entry missing:\n%s", fdb)
			}
			routes := ipOut(t, a, fam, "route", "show", "proto", "98")
			if !strings.Contains(routes, b.subnet.String()+" via "+b.subnet.Addr().String()+" dev "+dev) || !strings.Contains(routes, "onlink") {
				t.Errorf("onlink route missing:\n%s", routes)
			}
			if !strings.Contains(routes, "blackhole "+a.subnet.String()) {
				t.Errorf("blackhole route missing:\n%s", routes)
			}
			link := ipOut(t, a, "-d", "link", "show", dev)
			mtu := fmt.Sprintf("mtu %d", a.table(b, false).Device.MTU)
			for _, want := range []string{"vxlan id 1", "dstport 8472", "nolearning", mtu, a.mac.String()} {
				if !strings.Contains(link, want) {
					t.Errorf("device lacks %q:\n%s", want, link)
				}
			}
			if err := reach(t, a, b); err != nil {
				t.Fatalf("a -> b pod through the tunnel: %v", err)
			}
			// A restart over a correct state writes nothing.
			if ch := a.sync(t, a.table(b, false)); ch.Total() != 0 {
				t.Errorf("second sync changed %+v", ch)
			}
		})
	}
}

// Every kind of kernel entry, deleted by hand, comes back on the next sync.
func TestSyncRepairsDeletedEntries(t *testing.T) {
	f := families[0]
	a, b := twoNodes(t, f)
	a.sync(t, a.table(b, false))
	b.sync(t, b.table(a, false))
	dev := "vx-sluice.1"
	breakages := map[string][]string{
		"route":     {"route", "del", b.subnet.String()},
		"blackhole": {"route", "del", "blackhole", a.subnet.String()},
		"neighbour": {"neigh", "del", b.subnet.Addr().String(), "dev", dev},
		"fdb":       nil, // with bridge(8), below
		"down":      {"link", "set", dev, "down"},
		"device":    {"link", "del", dev},
		"mtu":       {"link", "set", dev, "mtu", "1300"},
		"vtep-addr": {"addr", "flush", "dev", dev},
	}
	for kind, args := range breakages {
		t.Run(kind, func(t *testing.T) {
			if kind == "fdb" {
				nettest.Run(t, "bridge", "-n", nettest.Name(a.netns), "fdb", "del", b.mac.String(), "dev", dev, "dst", b.ip.String())
			} else {
				ipOut(t, a, args...)
			}
			if ch := a.sync(t, a.table(b, false)); ch.Total() == 0 {
				t.Errorf("sync saw nothing to repair after deleting the %s", kind)
			}
			if err := reach(t, a, b); err != nil {
				t.Errorf("after repairing the %s: %v", kind, err)
			}
			if link := ipOut(t, a, "link", "show", dev); !strings.Contains(link, "mtu 1450") {
				t.Errorf("mtu not restored: %s", link)
			}
		})
	}
}

func TestRemovedPeerIsCleanedUp(t *testing.T) {
	a, b := twoNodes(t, families[0])
	a.sync(t, a.table(b, false))
	ch := a.sync(t, a.table(nil, false))
	if ch.Removed != 3 {
		t.Errorf("removing a peer removed %d entries, want 3 (route, neighbour, FDB)", ch.Removed)
	}
	if routes := ipOut(t, a, "route", "show", "proto", "98"); strings.Contains(routes, b.subnet.String()) {
		t.Errorf("route of the removed peer remains:\n%s", routes)
	}
	if neigh := ipOut(t, a, "neigh", "show", "dev", "vx-sluice.1"); strings.TrimSpace(neigh) != "" {
		t.Errorf("neighbour of the removed peer remains:\n%s", neigh)
	}
}

func TestChangedVNIRecreatesDevice(t *testing.T) {
	a, b := twoNodes(t, families[0])
	a.sync(t, a.table(b, false))
	b.sync(t, b.table(a, false))
	ta, tb := a.table(b, false), b.table(a, false)
	ta.Device.VNI, tb.Device.VNI = 42, 42
	if ch := a.sync(t, ta); ch.Device != 1 || ch.Routes == 0 {
		t.Errorf("VNI change: %+v; want the device recreated and entries replayed", ch)
	}
	b.sync(t, tb)
	if !strings.Contains(ipOut(t, a, "-d", "link", "show", "vx-sluice.1"), "vxlan id 42") {
		t.Error("device not recreated with VNI 42")
	}
	if err := reach(t, a, b); err != nil {
		t.Errorf("after VNI change: %v", err)
	}
}

func TestDirectRoutingOnSameL2(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			a, b := twoNodes(t, f)
			a.sync(t, a.table(b, true))
			b.sync(t, b.table(a, true))
			fam := map[bool]string{true: "-4", false: "-6"}[f.name == "ipv4"]
			routes := ipOut(t, a, fam, "route", "show", "proto", "98")
			if !strings.Contains(routes, b.subnet.String()+" via "+b.ip.String()+" dev eth0") {
				t.Errorf("no direct route:\n%s", routes)
			}
			if err := reach(t, a, b); err != nil {
				t.Errorf("direct routing: %v", err)
			}
		})
	}
}

func TestHostGW(t *testing.T) {
	a, b := twoNodes(t, families[0])
	ta, tb := a.table(b, false), b.table(a, false)
	ta.Device, tb.Device = nil, nil
	a.sync(t, ta)
	b.sync(t, tb)
	if err := reach(t, a, b); err != nil {
		t.Errorf("host-gw: %v", err)
	}
	if strings.Contains(ipOut(t, a, "link"), "vx-sluice.1") {
		t.Error("host-gw created a VXLAN device")
	}
}

func TestTXChecksumOffloadToggle(t *testing.T) {
	a, b := twoNodes(t, families[0])
	a.sync(t, a.table(b, false))
	nettest.Do(t, a.netns, func() error {
		on, err := TXChecksumOffload("vx-sluice.1")
		if err != nil {
			return err
		}
		if !on {
			t.Error("a new VXLAN device should have TX checksum offload on")
		}
		if err := SetTXChecksumOffload("vx-sluice.1", false); err != nil {
			return err
		}
		if on, _ := TXChecksumOffload("vx-sluice.1"); on {
			t.Error("offload still on after turning it off")
		}
		return SetTXChecksumOffload("vx-sluice.1", true)
	})
	b.sync(t, b.table(a, false))
	if err := reach(t, a, b); err != nil {
		t.Error(err)
	}
}

// skippedReasons maps each skipped peer to its reason.
func skippedReasons(ch Changes) map[string]string {
	m := map[string]string{}
	for _, s := range ch.Skipped {
		m[s.Node] = s.Reason
	}
	return m
}

// An off-link host-gw peer next to good ones: the good peers are
// programmed, the bad one is reported, and once fixed it is programmed on
// the next sync.
func TestOffLinkHostGWPeerDoesNotStallOthers(t *testing.T) {
	a, b := twoNodes(t, families[0])
	ta, tb := a.table(b, false), b.table(a, false)
	ta.Device, tb.Device = nil, nil
	ta.Peers = append(ta.Peers,
		Peer{Node: "bad", Subnet: netip.MustParsePrefix("10.244.9.0/24"), PublicIP: netip.MustParseAddr("203.0.113.9")},
		Peer{Node: "c", Subnet: netip.MustParsePrefix("10.244.3.0/24"), PublicIP: netip.MustParseAddr("192.0.2.3")})
	b.sync(t, tb)
	ch := a.sync(t, ta)
	skipped := skippedReasons(ch)
	if len(skipped) != 1 || !strings.Contains(skipped["bad"], "203.0.113.9") || !strings.Contains(skipped["bad"], "L2 segment") {
		t.Errorf("skipped = %v, want only the off-link peer with a reason naming its IP", skipped)
	}
	routes := ipOut(t, a, "-4", "route", "show", "proto", "98")
	for _, want := range []string{"10.244.2.0/24 via 192.0.2.2 dev eth0", "10.244.3.0/24 via 192.0.2.3 dev eth0", "blackhole 10.244.1.0/24"} {
		if !strings.Contains(routes, want) {
			t.Errorf("route %q missing next to the bad peer:\n%s", want, routes)
		}
	}
	if strings.Contains(routes, "10.244.9.0/24") {
		t.Errorf("the off-link peer got a route:\n%s", routes)
	}
	if err := reach(t, a, b); err != nil {
		t.Errorf("good peer unreachable next to a bad one: %v", err)
	}
	// Fixed: the peer moves onto the segment and is programmed at once.
	ta.Peers[1].PublicIP = netip.MustParseAddr("192.0.2.9")
	ch = a.sync(t, ta)
	if len(ch.Skipped) != 0 || ch.Routes != 1 {
		t.Errorf("after the fix: skipped %v, %d routes written; want none skipped and its route written", ch.Skipped, ch.Routes)
	}
	if routes := ipOut(t, a, "-4", "route", "show", "proto", "98"); !strings.Contains(routes, "10.244.9.0/24 via 192.0.2.9 dev eth0") {
		t.Errorf("fixed peer has no route:\n%s", routes)
	}
	// Broken again: its route goes, since it pointed at the old address.
	ta.Peers[1].PublicIP = netip.MustParseAddr("203.0.113.9")
	if ch := a.sync(t, ta); len(ch.Skipped) != 1 || ch.Removed != 1 {
		t.Errorf("broken again: %+v; want it skipped and its route removed", ch)
	}
}

// On the vxlan backend a peer without a VTEP MAC (a host-gw node) is
// skipped and reported, and the tunnel peers next to it are programmed.
func TestPeerWithoutVtepMACIsSkippedAndReported(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			a, b := twoNodes(t, f)
			ta := a.table(b, false)
			other := netip.MustParsePrefix("10.244.7.0/24")
			otherIP := netip.MustParseAddr("192.0.2.7")
			if f.name == "ipv6" {
				other, otherIP = netip.MustParsePrefix("fd00:10:244:7::/64"), netip.MustParseAddr("2001:db8::7")
			}
			ta.Peers = append(ta.Peers, Peer{Node: "hostgw-node", Subnet: other, PublicIP: otherIP})
			b.sync(t, b.table(a, false))
			ch := a.sync(t, ta)
			skipped := skippedReasons(ch)
			if len(skipped) != 1 || !strings.Contains(skipped["hostgw-node"], "no VTEP MAC") {
				t.Errorf("skipped = %v, want the peer without a VTEP MAC", skipped)
			}
			if ch.Neighbours != 1 || ch.FDB != 1 {
				t.Errorf("changes %+v; want the good peer's neighbour and FDB entry", ch)
			}
			dev, fam := ta.Device.Name, map[bool]string{true: "-4", false: "-6"}[f.name == "ipv4"]
			fdb := nettest.Run(t, "bridge", "-n", nettest.Name(a.netns), "fdb", "show", "dev", dev)
			if !strings.Contains(fdb, b.mac.String()+" dst "+b.ip.String()) {
				t.Errorf("good peer's FDB entry missing:\n%s", fdb)
			}
			routes := ipOut(t, a, fam, "route", "show", "proto", "98")
			if strings.Contains(routes, other.String()) || !strings.Contains(routes, b.subnet.String()+" via "+b.subnet.Addr().String()) {
				t.Errorf("routes: want the good peer's only:\n%s", routes)
			}
			if err := reach(t, a, b); err != nil {
				t.Errorf("good peer next to a skipped one: %v", err)
			}
			// With DirectRouting, the same peer on the segment gets a route.
			ta.DirectRouting = true
			ta.Peers = ta.Peers[1:]
			if ch := a.sync(t, ta); len(ch.Skipped) != 0 {
				t.Errorf("on-link peer without MAC under DirectRouting skipped: %v", ch.Skipped)
			}
		})
	}
}
