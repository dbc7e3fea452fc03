package overlay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
	"github.com/sluice-net/sluice/overlay/netconf"
)

// nsCluster is a few node namespaces on one underlay bridge, each running
// an overlay loop against one shared fake API server, each with a pod
// namespace behind a veth, as the CNI plugin would make it.
type nsCluster struct {
	// resync is the loops' resync period: short, so repairs and key
	// rotations show within a test, or long, so a test's own changes to
	// the kernel stay.
	resync   time.Duration
	client   *fake.Clientset
	underlay ns.NetNS
	nodes    []*nsNode
}

type nsNode struct {
	name   string
	netns  ns.NetNS
	pod    ns.NetNS
	ip     netip.Addr
	subnet netip.Prefix
	podIP  netip.Addr
	// ip6, subnet6 and podIP6 are set on a dual-stack cluster.
	ip6      netip.Addr
	subnet6  netip.Prefix
	podIP6   netip.Addr
	stateDir string
	loop     *Loop
	stop     func()
}

// startCluster makes n nodes with this net-conf.json's backend and waits
// until every loop is ready and has programmed every peer.
func startCluster(t testing.TB, n int, netConf string, resync time.Duration) *nsCluster {
	t.Helper()
	c := &nsCluster{resync: resync, client: fake.NewClientset(), underlay: nettest.NewNS(t)}
	under := nettest.Name(c.underlay)
	nettest.Run(t, "ip", "-n", under, "link", "add", "br0", "type", "bridge")
	nettest.Run(t, "ip", "-n", under, "link", "set", "br0", "up")
	nc, err := netconf.Parse([]byte(netConf))
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= n; i++ {
		c.addNode(t, nc)
	}
	c.waitProgrammed(t)
	// The pods take the overlay's MTU, as the CNI plugin gives them the
	// one subnet.env publishes.
	for _, node := range c.nodes {
		mtu := fmt.Sprint(node.loop.Status().MTU)
		nettest.Run(t, "ip", "-n", nettest.Name(node.netns), "link", "set", "slpod", "mtu", mtu)
		nettest.Run(t, "ip", "-n", nettest.Name(node.pod), "link", "set", "eth0", "mtu", mtu)
	}
	return c
}

// addNode makes the next node, its Node object and its running loop.
func (c *nsCluster) addNode(t testing.TB, nc *netconf.Config) *nsNode {
	t.Helper()
	i := len(c.nodes) + 1
	node := &nsNode{name: fmt.Sprintf("node-%d", i), netns: nettest.NewNS(t), pod: nettest.NewNS(t),
		ip:     netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}),
		subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24), stateDir: t.TempDir()}
	node.podIP = node.subnet.Addr().Next().Next()
	cidrs := []string{node.subnet.String()}
	if nc.EnableIPv6 {
		node.ip6 = netip.MustParseAddr(fmt.Sprintf("fd00:192::%d", i))
		node.subnet6 = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i))
		node.podIP6 = node.subnet6.Addr().Next().Next()
		cidrs = append(cidrs, node.subnet6.String())
	}
	c.wire(t, node, i)
	k8sNode := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: node.name},
		Spec: corev1.NodeSpec{PodCIDR: node.subnet.String(), PodCIDRs: cidrs}}
	if _, err := c.client.CoreV1().Nodes().Create(context.Background(), k8sNode, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	c.nodes = append(c.nodes, node)
	c.start(t, node, nc)
	return node
}

// wire plugs a node into the bridge and its pod into the node.
func (c *nsCluster) wire(t testing.TB, node *nsNode, i int) {
	under, nn, pod := nettest.Name(c.underlay), nettest.Name(node.netns), nettest.Name(node.pod)
	port := fmt.Sprintf("p%d", i)
	nettest.Run(t, "ip", "-n", under, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", nn)
	nettest.Run(t, "ip", "-n", under, "link", "set", port, "master", "br0", "up")
	nettest.Run(t, "ip", "-n", nn, "addr", "add", node.ip.String()+"/24", "dev", "eth0")
	nettest.Run(t, "ip", "-n", nn, "link", "set", "eth0", "up")
	nettest.Run(t, "ip", "netns", "exec", nn, "sysctl", "-qw", "net.ipv4.ip_forward=1")
	// The pod: a /32 route on the node's side, and a default route via a
	// link-local gateway address on the node's end of the veth.
	nettest.Run(t, "ip", "-n", nn, "link", "add", "slpod", "type", "veth", "peer", "name", "eth0", "netns", pod)
	nettest.Run(t, "ip", "-n", nn, "link", "set", "slpod", "up")
	nettest.Run(t, "ip", "-n", nn, "addr", "add", "169.254.1.1/32", "dev", "slpod", "scope", "link")
	nettest.Run(t, "ip", "-n", nn, "route", "add", node.podIP.String()+"/32", "dev", "slpod")
	nettest.Run(t, "ip", "-n", pod, "addr", "add", node.podIP.String()+"/32", "dev", "eth0")
	nettest.Run(t, "ip", "-n", pod, "link", "set", "eth0", "up")
	nettest.Run(t, "ip", "-n", pod, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
	nettest.Run(t, "ip", "-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
	if node.ip6.IsValid() {
		nettest.Run(t, "ip", "netns", "exec", nn, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
		nettest.Run(t, "ip", "-n", nn, "addr", "add", node.ip6.String()+"/64", "dev", "eth0", "nodad")
		nettest.Run(t, "ip", "-n", nn, "addr", "add", "fe80::1/64", "dev", "slpod", "nodad")
		nettest.Run(t, "ip", "-n", nn, "route", "add", node.podIP6.String()+"/128", "dev", "slpod")
		nettest.Run(t, "ip", "-n", pod, "addr", "add", node.podIP6.String()+"/128", "dev", "eth0", "nodad")
		nettest.Run(t, "ip", "-n", pod, "route", "add", "default", "via", "fe80::1", "dev", "eth0")
	}
}

// start runs a node's loop in its namespace; the test's end stops it.
func (c *nsCluster) start(t testing.TB, node *nsNode, nc *netconf.Config) {
	node.loop = New(Config{NodeName: node.name, Net: nc, Iface: InterfaceSelection{Ifaces: []string{"eth0"}}, ChecksumOffload: "on",
		RunDir: filepath.Join(node.stateDir, "run"), StateDir: node.stateDir, ResyncPeriod: c.resync, IPTablesMode: iptables.ModeNFT}, c.client, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	loop := node.loop
	go func() { done <- node.netns.Do(func(ns.NetNS) error { return loop.Run(ctx) }) }()
	stopped := false
	node.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("loop of %s: %v", node.name, err)
		}
	}
	t.Cleanup(node.stop)
}

// restart stops a node's loop and starts a new one, as an agent restart.
func (c *nsCluster) restart(t testing.TB, node *nsNode) {
	c.restartWith(t, node, node.loop.cfg.Net)
}

// restartWith restarts a node's agent with another net-conf.json, as
// rolling the DaemonSet after a ConfigMap change does.
func (c *nsCluster) restartWith(t testing.TB, node *nsNode, nc *netconf.Config) {
	node.stop()
	c.start(t, node, nc)
}

// waitProgrammed waits until every loop is ready with every other node
// as a peer without a problem.
func (c *nsCluster) waitProgrammed(t testing.TB) {
	t.Helper()
	eventually(t, "every node programs every peer", func() bool {
		for _, node := range c.nodes {
			st := node.loop.Status()
			ok := map[string]bool{}
			for _, p := range st.Peers {
				if p.Problem != "" {
					return false
				}
				ok[p.Node] = true
			}
			if !st.Ready || len(ok) != len(c.nodes)-1 {
				return false
			}
		}
		return true
	})
}

func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting until %s", what)
}

// listen serves TCP on a pod: every connection gets back what it sent.
func listen(t testing.TB, pod ns.NetNS, port int) {
	t.Helper()
	var l net.Listener
	nettest.Do(t, pod, func() error {
		var err error
		l, err = net.Listen("tcp", fmt.Sprintf(":%d", port))
		return err
	})
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			go func() { defer conn.Close(); _, _ = io.Copy(conn, conn) }()
		}
	}()
}

// dial opens a TCP connection from a pod.
func dial(pod ns.NetNS, to netip.AddrPort) (net.Conn, error) {
	var conn net.Conn
	err := pod.Do(func(ns.NetNS) error {
		var err error
		conn, err = net.DialTimeout("tcp", to.String(), 3*time.Second)
		return err
	})
	return conn, err
}

// echo sends msg over conn and reads it back, within timeout.
func echo(conn net.Conn, msg string, timeout time.Duration) error {
	_ = conn.SetDeadline(time.Now().Add(timeout))
	if _, err := conn.Write([]byte(msg)); err != nil {
		return err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, buf); err != nil {
		return err
	}
	if string(buf) != msg {
		return fmt.Errorf("echo: got %q", buf)
	}
	return nil
}

// udpEcho sends one datagram from a pod to a UDP echo server on another
// and waits for the answer.
func udpEcho(t testing.TB, from, to *nsNode, port int) error {
	t.Helper()
	var srv net.PacketConn
	nettest.Do(t, to.pod, func() error {
		var err error
		srv, err = net.ListenPacket("udp", fmt.Sprintf(":%d", port))
		return err
	})
	defer srv.Close()
	go func() {
		buf := make([]byte, 1500)
		for {
			n, addr, err := srv.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = srv.WriteTo(buf[:n], addr)
		}
	}()
	var conn net.Conn
	nettest.Do(t, from.pod, func() error {
		var err error
		conn, err = net.Dial("udp", netip.AddrPortFrom(to.podIP, uint16(port)).String())
		return err
	})
	defer conn.Close()
	var last error
	for i := 0; i < 5; i++ {
		if last = echo(conn, "udp-ping", time.Second); last == nil {
			return nil
		}
	}
	return last
}

func readFile(t testing.TB, path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
