package overlay

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/nettest"
	"github.com/sluice-net/sluice/overlay/netconf"
	"github.com/sluice-net/sluice/overlay/wireguard"
)

const wgNetConf = `{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "Implementation": "userspace"}}`

func TestWireGuardPodsReachEachOther(t *testing.T) {
	c := startCluster(t, 3, wgNetConf, time.Second)
	for _, n := range c.nodes {
		st := n.loop.Status()
		if st.Implementation != "userspace" || st.MTU != 1500-60 {
			t.Errorf("%s: implementation %q, MTU %d (want userspace, 1440)", n.name, st.Implementation, st.MTU)
		}
		if env := readFile(t, filepath.Join(n.stateDir, "run", "subnet.env")); !strings.Contains(env, "SLUICE_MTU=1440\n") {
			t.Errorf("%s: subnet.env %q", n.name, env)
		}
		listen(t, n.pod, 8080)
	}
	for _, from := range c.nodes {
		for _, to := range c.nodes {
			if from == to {
				continue
			}
			conn, err := dial(from.pod, netip.AddrPortFrom(to.podIP, 8080))
			if err == nil {
				err = echo(conn, "hello "+to.name, 3*time.Second)
				conn.Close()
			}
			if err != nil {
				t.Errorf("TCP %s -> %s: %v", from.name, to.name, err)
			}
			if err := udpEcho(t, from, to, 9090); err != nil {
				t.Errorf("UDP %s -> %s: %v", from.name, to.name, err)
			}
		}
	}
	// Every peer's handshake shows in the status (from the next sync on).
	eventually(t, "node-1's status shows a handshake with every peer", func() bool {
		for _, p := range c.nodes[0].loop.Status().Peers {
			if p.LastHandshake.IsZero() {
				return false
			}
		}
		return len(c.nodes[0].loop.Status().Peers) == 2
	})
	// The node publishes its key as flannel's wireguard backend does.
	self, err := c.client.CoreV1().Nodes().Get(context.Background(), "node-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var data struct{ PublicKey string }
	if err := json.Unmarshal([]byte(self.Annotations[AnnBackendData]), &data); err != nil || data.PublicKey != c.nodes[0].loop.Status().PublicKey ||
		self.Annotations[AnnBackendType] != "wireguard" {
		t.Errorf("annotations %v", self.Annotations)
	}
}

// encryptionSeen sends a marker from node-1's pod to node-2's and reports
// whether the underlay capture saw it, and which UDP ports it saw.
func encryptionSeen(t *testing.T, netConf string) (marker bool, udpPorts map[uint16]int) {
	c := startCluster(t, 2, netConf, time.Second)
	listen(t, c.nodes[1].pod, 8080)
	capture := nettest.StartCapture(t, c.underlay, "p1")
	msg := fmt.Sprintf("sluice-secret-%d", time.Now().UnixNano())
	conn, err := dial(c.nodes[0].pod, netip.AddrPortFrom(c.nodes[1].podIP, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := echo(conn, msg, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	capture.Stop()
	udpPorts = map[uint16]int{}
	for _, f := range capture.IPFlows() {
		switch f.Proto {
		case unix.IPPROTO_UDP:
			udpPorts[f.DstPort]++
		case unix.IPPROTO_TCP:
			t.Logf("plain TCP on the underlay: %+v", f)
			udpPorts[0]++
		}
	}
	return capture.Contains([]byte(msg)), udpPorts
}

// Encryption is real: on the underlay, only UDP to the WireGuard port, and
// the marker nowhere. With VXLAN the same capture sees the marker, so the
// test can fail.
func TestWireGuardEncryptsOnTheUnderlay(t *testing.T) {
	t.Run("wireguard", func(t *testing.T) {
		marker, ports := encryptionSeen(t, wgNetConf)
		if marker {
			t.Error("the marker crossed the underlay in the clear")
		}
		if ports[51820] == 0 {
			t.Errorf("no UDP to 51820 on the underlay: %v", ports)
		}
		for p, n := range ports {
			if p != 51820 {
				t.Errorf("%d packets to port %d on the underlay besides WireGuard's", n, p)
			}
		}
	})
	t.Run("vxlan-control", func(t *testing.T) {
		marker, ports := encryptionSeen(t, `{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}`)
		if !marker {
			t.Errorf("VXLAN: the marker was not seen, so the capture proves nothing (ports %v)", ports)
		}
	})
}

// A peer's packets from an address that is not a known node's, even with
// the right key (a stolen one), are dropped by the source filter before
// WireGuard could move the peer's endpoint there. The control: the same
// impostor gets through once the filter is flushed.
func TestWireGuardDropsUnknownEndpoint(t *testing.T) {
	// No resync: the control's flushed filter must stay flushed.
	c := startCluster(t, 2, wgNetConf, time.Hour)
	node1, node2 := c.nodes[0], c.nodes[1]
	listen(t, node1.pod, 8080)
	// The impostor: a namespace on the underlay with node-2's key.
	imp := nettest.NewNS(t)
	under, in := nettest.Name(c.underlay), nettest.Name(imp)
	nettest.Run(t, "ip", "-n", under, "link", "add", "pimp", "type", "veth", "peer", "name", "eth0", "netns", in)
	nettest.Run(t, "ip", "-n", under, "link", "set", "pimp", "master", "br0", "up")
	nettest.Run(t, "ip", "-n", in, "addr", "add", "192.0.2.99/24", "dev", "eth0")
	nettest.Run(t, "ip", "-n", in, "link", "set", "eth0", "up")
	stolen, _, err := wireguard.LoadOrCreateKey(filepath.Join(node2.stateDir, wireguard.KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	node1Key, err := wgtypes.ParseKey(node1.loop.Status().PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	impl := wireguard.NewUserspace(wireguard.UserspaceOptions{})
	t.Cleanup(func() { _ = impl.Close() })
	st := wireguard.State{Own: []netip.Prefix{node2.subnet}, Devices: []wireguard.Device{{
		Tunnel: wireguard.Tunnel{Name: "wg-imp", PrivateKey: stolen, ListenPort: 51820, Peers: []wireguard.Peer{{
			PublicKey: node1Key, Endpoint: netip.MustParseAddrPort("192.0.2.1:51820"), AllowedIPs: []netip.Prefix{node1.subnet}}}},
		MTU: 1420, Addrs: []netip.Addr{netip.MustParseAddr("10.244.2.77")}}}}
	nettest.Do(t, imp, func() error { _, err := wireguard.Sync(impl, st); return err })
	try := func() error {
		conn, err := dial(imp, netip.AddrPortFrom(node1.podIP, 8080))
		if err == nil {
			conn.Close()
		}
		return err
	}
	if err := try(); err == nil {
		t.Fatal("an impostor with a stolen key from an unknown address reached node-1's pod")
	}
	if rules := nettest.Run(t, "ip", "netns", "exec", nettest.Name(node1.netns), "iptables", "-S", "SLUICE-INPUT"); !strings.Contains(rules, "--dport 51820") ||
		!strings.Contains(rules, "WireGuard from an address that is not a known node") {
		t.Errorf("the source filter does not guard WireGuard's port:\n%s", rules)
	}
	// Control: without the source filter, WireGuard alone lets the
	// impostor in (it roams node-2's endpoint to the impostor).
	nettest.Run(t, "ip", "netns", "exec", nettest.Name(node1.netns), "iptables", "-F", "SLUICE-INPUT")
	if err := try(); err != nil {
		t.Errorf("control: with the filter flushed, the impostor did not get in either (%v), so the test proves nothing", err)
	}
}

func TestWireGuardKeyPersistsAndRotates(t *testing.T) {
	c := startCluster(t, 2, wgNetConf, time.Second)
	node1, node2 := c.nodes[0], c.nodes[1]
	listen(t, node2.pod, 8080)
	key1 := node1.loop.Status().PublicKey
	conn, err := dial(node1.pod, netip.AddrPortFrom(node2.podIP, 8080))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := echo(conn, "before", 3*time.Second); err != nil {
		t.Fatal(err)
	}
	// An agent restart keeps the key, the device and the connection.
	restarted := time.Now()
	c.restart(t, node1)
	c.waitProgrammed(t)
	t.Logf("agent stopped to programmed again: %v", time.Since(restarted))
	if k := node1.loop.Status().PublicKey; k != key1 {
		t.Errorf("restart changed the key: %s -> %s", key1, k)
	}
	if err := echo(conn, "after restart", 10*time.Second); err != nil {
		t.Errorf("TCP connection across the agent restart: %v", err)
	}
	t.Logf("agent stopped to the connection's next echo: %v", time.Since(restarted))
	// Rotation: a new key file; the peer follows and the connection
	// survives.
	rotated := time.Now()
	if _, err := wireguard.RotateKey(filepath.Join(node1.stateDir, wireguard.KeyFile)); err != nil {
		t.Fatal(err)
	}
	eventually(t, "node-2 programs node-1's new key", func() bool {
		k := node1.loop.Status().PublicKey
		for _, p := range node2.loop.Status().Peers {
			if p.Node == "node-1" && p.PublicKey == k && k != key1 {
				return true
			}
		}
		return false
	})
	if err := echo(conn, "after rotation", 15*time.Second); err != nil {
		t.Errorf("TCP connection across the key rotation: %v", err)
	}
	t.Logf("key file replaced to the connection's next echo: %v (resync period 1s)", time.Since(rotated))
	// Deleting the key file rotates too.
	if err := os.Remove(filepath.Join(node1.stateDir, wireguard.KeyFile)); err != nil {
		t.Fatal(err)
	}
	key2 := node1.loop.Status().PublicKey
	eventually(t, "a deleted key file makes a new key", func() bool { return node1.loop.Status().PublicKey != key2 })
}

func TestWireGuardNodeGoesAndComes(t *testing.T) {
	c := startCluster(t, 3, wgNetConf, time.Second)
	node1 := c.nodes[0]
	if err := c.client.CoreV1().Nodes().Delete(context.Background(), "node-3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	c.nodes[2].stop()
	eventually(t, "node-3's peer goes from node-1", func() bool {
		for _, p := range node1.loop.Status().Peers {
			if p.Node == "node-3" {
				return false
			}
		}
		return true
	})
	eventually(t, "node-3's route and peer entry go", func() bool {
		out := nettest.Run(t, "ip", "-n", nettest.Name(node1.netns), "route", "show", "10.244.3.0/24")
		return !strings.Contains(out, "wg-sluice")
	})
	if n := peerEntries(t, node1); n != 1 {
		t.Errorf("node-1 has %d WireGuard peers after node-3 went, want 1", n)
	}
	// A new node joins, and pods reach it.
	node4 := c.addNode(t, node1.loop.cfg.Net)
	c.nodes = []*nsNode{c.nodes[0], c.nodes[1], node4}
	c.waitProgrammed(t)
	listen(t, node4.pod, 8080)
	conn, err := dial(node1.pod, netip.AddrPortFrom(node4.podIP, 8080))
	if err == nil {
		err = echo(conn, "welcome", 3*time.Second)
		conn.Close()
	}
	if err != nil {
		t.Errorf("TCP to the new node's pod: %v", err)
	}
	if n := peerEntries(t, node1); n != 2 {
		t.Errorf("node-1 has %d WireGuard peers, want 2", n)
	}
}

func peerEntries(t *testing.T, n *nsNode) int {
	d, err := n.loop.backend.(*wgBackend).impl.Client().Device(wgDevice4)
	if err != nil {
		t.Fatal(err)
	}
	return len(d.Peers)
}

// Switching backends, the README's procedure: change net-conf.json and
// restart the agents. While the nodes disagree, each reports the other
// as not programmed (and no pod packet leaves in the clear: the cluster
// network is blackholed on the wireguard node); once all have switched,
// pods reach each other again, in both directions of the switch.
func TestSwitchVXLANToWireGuardAndBack(t *testing.T) {
	vxConf := `{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}`
	c := startCluster(t, 2, vxConf, time.Second)
	node1, node2 := c.nodes[0], c.nodes[1]
	listen(t, node2.pod, 8080)
	reach := func(what string) {
		t.Helper()
		var err error
		for i := 0; i < 20; i++ {
			var conn net.Conn
			if conn, err = dial(node1.pod, netip.AddrPortFrom(node2.podIP, 8080)); err == nil {
				err = echo(conn, what, 2*time.Second)
				conn.Close()
				if err == nil {
					return
				}
			}
		}
		t.Fatalf("%s: %v", what, err)
	}
	reach("vxlan")
	for _, conf := range []string{wgNetConf, vxConf} {
		nc, err := netconf.Parse([]byte(conf))
		if err != nil {
			t.Fatal(err)
		}
		c.restartWith(t, node1, nc)
		// The former backend's device is gone: a VXLAN device left on a
		// wireguard node would take VXLAN from anyone.
		former := map[string]string{"wireguard": "vx-sluice.1", "vxlan": "wg-sluice"}[nc.Backend.Type]
		eventually(t, "the former backend's "+former+" goes", func() bool {
			return !strings.Contains(nettest.Run(t, "ip", "-n", nettest.Name(node1.netns), "-o", "link", "show"), former+":")
		})
		eventually(t, "node-1 reports node-2 on the other backend", func() bool {
			for _, p := range node1.loop.Status().Peers {
				if p.Node == "node-2" && (strings.Contains(p.Problem, "not wireguard") || strings.Contains(p.Problem, "VTEP MAC")) {
					return true
				}
			}
			return false
		})
		c.restartWith(t, node2, nc)
		c.waitProgrammed(t)
		reach(nc.Backend.Type)
	}
}

// Dual-stack pods reach each other over IPv4 and IPv6, with a tunnel per
// family (separate) or one for both (auto).
func TestWireGuardDualStack(t *testing.T) {
	for _, mode := range []string{"separate", "auto"} {
		t.Run(mode, func(t *testing.T) {
			c := startCluster(t, 2, `{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56",
				"Backend": {"Type": "wireguard", "Implementation": "userspace", "Mode": "`+mode+`"}}`, time.Second)
			node1, node2 := c.nodes[0], c.nodes[1]
			if mtu := node1.loop.Status().MTU; mtu != 1500-80 {
				t.Errorf("dual-stack MTU %d, want 1420", mtu)
			}
			listen(t, node2.pod, 8080)
			for _, to := range []netip.Addr{node2.podIP, node2.podIP6} {
				var err error
				for i := 0; i < 5; i++ {
					var conn net.Conn
					if conn, err = dial(node1.pod, netip.AddrPortFrom(to, 8080)); err == nil {
						err = echo(conn, "dual "+mode, 2*time.Second)
						conn.Close()
						if err == nil {
							break
						}
					}
				}
				if err != nil {
					t.Errorf("TCP to %s: %v", to, err)
				}
			}
			links := nettest.Run(t, "ip", "-n", nettest.Name(node1.netns), "-o", "link", "show")
			if has6 := strings.Contains(links, "wg6-sluice"); has6 != (mode == "separate") {
				t.Errorf("mode %s: wg6-sluice present=%v\n%s", mode, has6, links)
			}
		})
	}
}
