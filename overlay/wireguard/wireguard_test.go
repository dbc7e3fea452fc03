package wireguard

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/sluice-net/sluice/internal/nettest"
)

// wgNode is a node namespace with an underlay address, a key and a
// userspace implementation, for tests of this package alone.
type wgNode struct {
	ns   ns.NetNS
	ip   netip.Addr
	own  netip.Prefix
	key  wgtypes.Key
	impl Implementation
}

// twoNodes makes two node namespaces joined by a veth pair (the underlay).
func twoNodes(t *testing.T) (*wgNode, *wgNode) {
	a := &wgNode{ns: nettest.NewNS(t), ip: netip.MustParseAddr("192.0.2.1"), own: netip.MustParsePrefix("10.244.1.0/24")}
	b := &wgNode{ns: nettest.NewNS(t), ip: netip.MustParseAddr("192.0.2.2"), own: netip.MustParsePrefix("10.244.2.0/24")}
	nettest.Run(t, "ip", "-n", nettest.Name(a.ns), "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", nettest.Name(b.ns))
	for _, n := range []*wgNode{a, b} {
		nettest.Run(t, "ip", "-n", nettest.Name(n.ns), "addr", "add", n.ip.String()+"/24", "dev", "eth0")
		nettest.Run(t, "ip", "-n", nettest.Name(n.ns), "link", "set", "eth0", "up")
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		n.key = k
		n.impl = NewUserspace(UserspaceOptions{SocketDir: t.TempDir()})
		impl := n.impl
		t.Cleanup(func() { _ = impl.Close() })
	}
	return a, b
}

func (n *wgNode) state(peers ...Peer) State {
	return State{
		Devices: []Device{{Tunnel: Tunnel{Name: "wg-sluice", PrivateKey: n.key, ListenPort: 51820, Peers: peers}, MTU: 1440, Addrs: []netip.Addr{n.own.Addr()}}},
		Own:     []netip.Prefix{n.own}, Networks: []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16")},
	}
}

func (n *wgNode) asPeer() Peer {
	return Peer{Node: n.ip.String(), PublicKey: n.key.PublicKey(), Endpoint: netip.AddrPortFrom(n.ip, 51820), AllowedIPs: []netip.Prefix{n.own}}
}

// useKernel switches both nodes to the kernel implementation, or skips
// the test on a kernel without WireGuard.
func useKernel(t *testing.T, nodes ...*wgNode) {
	var probe error
	nettest.Do(t, nodes[0].ns, func() error { probe = probeKernel(); return nil })
	if probe != nil {
		t.Skipf("%v: the kernel implementation's dataplane is not tested here; its configuration is (TestConfigureWritesOnlyDifferences)", probe)
	}
	for _, n := range nodes {
		nettest.Do(t, n.ns, func() error {
			k, err := NewKernel()
			if err != nil {
				return err
			}
			n.impl = k
			t.Cleanup(func() { _ = k.Close() })
			return nil
		})
	}
}

func (n *wgNode) sync(t *testing.T, st State) Changes {
	t.Helper()
	var ch Changes
	nettest.Do(t, n.ns, func() error {
		var err error
		ch, err = Sync(n.impl, st)
		return err
	})
	return ch
}

// reaches reports whether a ping from n to addr is answered within a few
// tries (the first may wait for the handshake).
func (n *wgNode) reaches(addr netip.Addr) bool {
	for i := 0; i < 3; i++ {
		if exec.Command("ip", "netns", "exec", nettest.Name(n.ns), "ping", "-c1", "-W1", addr.String()).Run() == nil {
			return true
		}
	}
	return false
}

func TestTunnelCarriesAndEncrypts(t *testing.T) {
	a, b := twoNodes(t)
	testTunnelCarriesAndEncrypts(t, a, b)
}

func TestKernelTunnelCarriesAndEncrypts(t *testing.T) {
	a, b := twoNodes(t)
	useKernel(t, a, b)
	testTunnelCarriesAndEncrypts(t, a, b)
}

func testTunnelCarriesAndEncrypts(t *testing.T, a, b *wgNode) {
	a.sync(t, a.state(b.asPeer()))
	b.sync(t, b.state(a.asPeer()))
	capture := nettest.StartCapture(t, a.ns, "eth0")
	if !a.reaches(b.own.Addr()) {
		t.Fatalf("node A cannot reach node B's pod subnet through the tunnel:\n%s\n%s", nettest.Run(t, "ip", "-n", nettest.Name(a.ns), "route"), nettest.Run(t, "ip", "-n", nettest.Name(a.ns), "addr"))
	}
	marker := fmt.Sprintf("sluice-marker-%d", time.Now().UnixNano())
	// The pattern makes ping carry the marker in every packet.
	hex := fmt.Sprintf("%x", marker[:16])
	out, err := exec.Command("ip", "netns", "exec", nettest.Name(a.ns), "ping", "-c2", "-W1", "-p", hex, b.own.Addr().String()).CombinedOutput()
	if err != nil {
		t.Fatalf("marked ping: %v\n%s", err, out)
	}
	capture.Stop()
	if capture.Contains([]byte(marker[:16])) {
		t.Error("the marker crossed the underlay in the clear")
	}
	udp := 0
	for _, f := range capture.IPFlows() {
		if f.Proto == unix.IPPROTO_ICMP {
			t.Errorf("plain ICMP on the underlay: %+v", f)
		}
		if f.Proto == unix.IPPROTO_UDP && (f.DstPort == 51820 || f.SrcPort == 51820) {
			udp++
		}
	}
	if udp == 0 {
		t.Error("no WireGuard (UDP 51820) packets on the underlay")
	}
}

// The control for the capture above: the same marked ping, sent over the
// plain underlay, is seen.
func TestCaptureSeesPlaintext(t *testing.T) {
	a, b := twoNodes(t)
	capture := nettest.StartCapture(t, a.ns, "eth0")
	marker := "sluice-plain-mk1"
	out, err := exec.Command("ip", "netns", "exec", nettest.Name(a.ns), "ping", "-c1", "-W1", "-p", fmt.Sprintf("%x", marker), b.ip.String()).CombinedOutput()
	if err != nil {
		t.Fatalf("ping: %v\n%s", err, out)
	}
	capture.Stop()
	if !capture.Contains([]byte(marker)) {
		t.Error("the capture missed a plaintext marker: it cannot tell encrypted from clear")
	}
}

func TestWrongKeyGetsNothingThrough(t *testing.T) {
	a, b := twoNodes(t)
	a.sync(t, a.state(b.asPeer()))
	b.sync(t, b.state(a.asPeer()))
	if !a.reaches(b.own.Addr()) {
		t.Fatal("control: the tunnel does not work with the right keys")
	}
	// B now expects another key for A: A's packets must not be accepted.
	impostor, _ := wgtypes.GeneratePrivateKey()
	wrong := a.asPeer()
	wrong.PublicKey = impostor.PublicKey()
	b.sync(t, b.state(wrong))
	if a.reaches(b.own.Addr()) {
		t.Error("B accepted A's packets under a key it does not know")
	}
}

func TestSyncIsIdempotentAndRepairs(t *testing.T) {
	a, b := twoNodes(t)
	if ch := a.sync(t, a.state(b.asPeer())); ch.Device == 0 || ch.Peers != 1 || ch.Routes == 0 {
		t.Fatalf("first sync wrote %+v", ch)
	}
	if ch := a.sync(t, a.state(b.asPeer())); ch != (Changes{}) {
		t.Errorf("second sync over a correct state wrote %+v", ch)
	}
	name := nettest.Name(a.ns)
	nettest.Run(t, "ip", "-n", name, "route", "del", b.own.String())
	if ch := a.sync(t, a.state(b.asPeer())); ch.Routes != 1 {
		t.Errorf("a deleted route: repair wrote %+v", ch)
	}
	// A removed peer goes, with its route.
	ch := a.sync(t, a.state())
	if ch.Removed < 2 {
		t.Errorf("stale peer and route: removed %d", ch.Removed)
	}
	if r := nettest.Run(t, "ip", "-n", name, "route", "show", b.own.String()); strings.TrimSpace(r) != "" {
		t.Errorf("route of a removed peer stays: %s", r)
	}
	// Deleting the device behind the agent's back: it comes back.
	nettest.Run(t, "ip", "-n", name, "link", "del", "wg-sluice")
	if ch := a.sync(t, a.state(b.asPeer())); ch.Device == 0 {
		t.Errorf("deleted device: repair wrote %+v", ch)
	}
	b.sync(t, b.state(a.asPeer()))
	if !a.reaches(b.own.Addr()) {
		t.Error("tunnel does not work after the device was recreated")
	}
}

// The TUN device outlives the agent (Close), with its routes, and a new
// agent reattaches to it.
func TestDeviceSurvivesAgentRestart(t *testing.T) {
	a, b := twoNodes(t)
	a.sync(t, a.state(b.asPeer()))
	b.sync(t, b.state(a.asPeer()))
	if !a.reaches(b.own.Addr()) {
		t.Fatal("control: tunnel does not work")
	}
	index := func() string {
		return strings.Fields(nettest.Run(t, "ip", "-n", nettest.Name(a.ns), "-o", "link", "show", "wg-sluice"))[0]
	}
	before := index()
	_ = a.impl.Close()
	if r := nettest.Run(t, "ip", "-n", nettest.Name(a.ns), "route", "show", b.own.String()); !strings.Contains(r, "wg-sluice") {
		t.Errorf("the route through the device went with the agent: %q", r)
	}
	// A real restart takes longer than this: the peer refuses a second
	// handshake initiation within 20 ms of the last, and one whose
	// timestamp (kept at about 16 ms granularity) is not newer, as
	// replays; it would wait for the 5 s retry.
	time.Sleep(100 * time.Millisecond)
	a.impl = NewUserspace(UserspaceOptions{})
	if ch := a.sync(t, a.state(b.asPeer())); ch.Routes != 0 || ch.Removed != 0 {
		t.Errorf("the new agent had to rewrite routes: %+v", ch)
	}
	if after := index(); after != before {
		t.Errorf("the TUN device was recreated (index %s, was %s), not reattached", after, before)
	}
	if !a.reaches(b.own.Addr()) {
		t.Error("tunnel does not work after the agent reattached")
	}
	_ = a.impl.Close()
}

func TestChooseFallsBackToUserspace(t *testing.T) {
	n := nettest.NewNS(t)
	nettest.Do(t, n, func() error {
		if probeKernel() == nil {
			t.Skip("this kernel has WireGuard; the fallback is not exercised")
		}
		impl, why, err := Choose("auto", UserspaceOptions{})
		if err != nil {
			return err
		}
		if impl.Name() != "userspace" || !strings.Contains(why, "kernel has no WireGuard") {
			t.Errorf("auto chose %s: %s", impl.Name(), why)
		}
		if _, _, err := Choose("kernel", UserspaceOptions{}); err == nil || !strings.Contains(err.Error(), `"userspace"`) {
			t.Errorf("kernel on a kernel without WireGuard: %v", err)
		}
		return nil
	})
}

// A TUN device of that name that cannot be attached to as WireGuard's
// (here: a TAP device) is replaced.
func TestForeignTUNDeviceIsReplaced(t *testing.T) {
	a, b := twoNodes(t)
	nettest.Run(t, "ip", "-n", nettest.Name(a.ns), "tuntap", "add", "dev", "wg-sluice", "mode", "tap")
	a.sync(t, a.state(b.asPeer()))
	b.sync(t, b.state(a.asPeer()))
	if !a.reaches(b.own.Addr()) {
		t.Error("the tunnel does not work over a replaced TAP device")
	}
}

// A second agent on the node does not take the tunnel from the first.
func TestHeldTUNDeviceIsNotTaken(t *testing.T) {
	a, b := twoNodes(t)
	a.sync(t, a.state(b.asPeer()))
	second := NewUserspace(UserspaceOptions{})
	t.Cleanup(func() { _ = second.Close() })
	var err error
	nettest.Do(t, a.ns, func() error {
		_, err = second.Ensure("wg-sluice", 1440)
		return nil
	})
	if err == nil || !strings.Contains(err.Error(), "held by another process") {
		t.Errorf("a second agent opened the device: %v", err)
	}
	b.sync(t, b.state(a.asPeer()))
	if !a.reaches(b.own.Addr()) {
		t.Error("the first agent's tunnel broke")
	}
}

// wgctrl (and so `wg`) reads and configures the userspace device through
// its UAPI socket, where wgctrl looks: /var/run/wireguard of its mount
// namespace. The device's name is unique to the test run.
func TestWgctrlConfiguresUserspaceDeviceOverUAPI(t *testing.T) {
	const dir = "/var/run/wireguard"
	if _, err := os.Stat(dir); os.IsNotExist(err) {
		t.Cleanup(func() { _ = os.Remove(dir) }) // only if this test made it and it is empty
	}
	n := nettest.NewNS(t)
	name := "wgt" + strings.TrimPrefix(nettest.Name(n), "sltest-")
	impl := NewUserspace(UserspaceOptions{SocketDir: dir})
	t.Cleanup(func() { _ = impl.Close() })
	k, _ := wgtypes.GeneratePrivateKey()
	nettest.Do(t, n, func() error { _, err := impl.Ensure(name, 1420); return err })
	c, err := wgctrl.New()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	port := 51999
	peer, _ := wgtypes.GeneratePrivateKey()
	if err := c.ConfigureDevice(name, wgtypes.Config{PrivateKey: &k, ListenPort: &port,
		Peers: []wgtypes.PeerConfig{{PublicKey: peer.PublicKey(), AllowedIPs: []net.IPNet{{IP: net.IPv4(10, 244, 9, 0), Mask: net.CIDRMask(24, 32)}}}}}); err != nil {
		t.Fatalf("wgctrl cannot configure the userspace device: %v", err)
	}
	d, err := impl.Client().Device(name)
	if err != nil {
		t.Fatal(err)
	}
	if d.PublicKey != k.PublicKey() || d.ListenPort != port || len(d.Peers) != 1 || d.Peers[0].PublicKey != peer.PublicKey() {
		t.Errorf("the agent's view after wgctrl's write: %+v", d)
	}
	if got, err := c.Device(name); err != nil || got.Type != wgtypes.Userspace || got.PublicKey != k.PublicKey() {
		t.Errorf("wgctrl's view: %+v %v", got, err)
	}
	_ = impl.Close()
	if _, err := os.Stat(filepath.Join(dir, name+".sock")); !os.IsNotExist(err) {
		t.Errorf("the socket outlives the device: %v", err)
	}
}
