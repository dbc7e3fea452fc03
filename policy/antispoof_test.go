package policy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	osexec "os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus/testutil"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sluice-net/sluice/cni/endpointapi"
	"github.com/sluice-net/sluice/internal/metrics"
	"github.com/sluice-net/sluice/internal/nettest"
)

// podNet is a node namespace with pods wired as the CNI plugin wires them:
// a veth per pod, the pod's addresses as /32 and /128 with routes through
// the host veth, proxy ARP for the IPv4 gateway and the host veth's fixed
// link-local address as the IPv6 gateway.
type podNet struct {
	node ns.NetNS
	pods map[string]ns.NetNS
	eps  []endpointapi.Endpoint
}

func wirePods(t testing.TB, pods map[string][2]string) *podNet {
	pn := &podNet{node: nettest.NewNS(t), pods: map[string]ns.NetNS{}}
	node := nettest.Name(pn.node)
	ip := func(args ...string) { nettest.Run(t, "ip", args...) }
	for _, s := range []string{"net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"} {
		nettest.Run(t, "ip", "netns", "exec", node, "sysctl", "-qw", s)
	}
	// Proxy ARP answers for 169.254.1.1 only if the node has a route to
	// it; a node always has a default route. (This kernel has no dummy
	// devices: the uplink is a veth to a namespace of its own.)
	world := nettest.Name(nettest.NewNS(t))
	ip("-n", node, "link", "add", "uplink", "type", "veth", "peer", "name", "uplink", "netns", world)
	ip("-n", node, "link", "set", "uplink", "up")
	ip("-n", node, "route", "add", "default", "dev", "uplink")
	ip("-n", node, "-6", "route", "add", "default", "dev", "uplink")
	for key, addrs := range pods {
		p := nettest.NewNS(t)
		pn.pods[key] = p
		pod, veth := nettest.Name(p), vethOf(key)
		ip("-n", node, "link", "add", veth, "address", "ee:ee:ee:ee:ee:ee", "type", "veth", "peer", "name", "eth0", "netns", pod)
		for _, s := range []string{"net.ipv4.conf." + veth + ".proxy_arp=1", "net.ipv4.neigh." + veth + ".proxy_delay=0", "net.ipv6.conf." + veth + ".accept_dad=0"} {
			nettest.Run(t, "ip", "netns", "exec", node, "sysctl", "-qw", s)
		}
		ip("-n", node, "link", "set", veth, "up")
		ip("-n", node, "route", "add", addrs[0]+"/32", "dev", veth, "scope", "link")
		ip("-n", node, "-6", "route", "add", addrs[1]+"/128", "dev", veth)
		ip("-n", pod, "addr", "add", addrs[0]+"/32", "dev", "eth0")
		ip("-n", pod, "addr", "add", addrs[1]+"/128", "dev", "eth0", "nodad")
		ip("-n", pod, "link", "set", "eth0", "up")
		ip("-n", pod, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
		ip("-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
		ip("-n", pod, "-6", "route", "add", "default", "via", "fe80::ecee:eeff:feee:eeee", "dev", "eth0")
		pn.eps = append(pn.eps, endpointapi.Endpoint{ContainerID: "c-" + key, Namespace: key[:1], Pod: key[2:], IfName: "eth0", HostVeth: veth, IPs: addrs[:]})
	}
	return pn
}

// serve listens on TCP and UDP port 9000 on all addresses of a pod, and
// reports the source address of every UDP datagram.
func serve(t *testing.T, pod ns.NetNS, network string) <-chan netip.Addr {
	got := make(chan netip.Addr, 100)
	var tcp net.Listener
	var udp net.PacketConn
	nettest.Do(t, pod, func() (err error) {
		if tcp, err = net.Listen("tcp"+network, ":9000"); err != nil {
			return err
		}
		udp, err = net.ListenPacket("udp"+network, ":9000")
		return err
	})
	t.Cleanup(func() { tcp.Close(); udp.Close() })
	go func() {
		for {
			c, err := tcp.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	go func() {
		buf := make([]byte, 100)
		for {
			_, from, err := udp.ReadFrom(buf)
			if err != nil {
				return
			}
			got <- from.(*net.UDPAddr).AddrPort().Addr().Unmap()
		}
	}()
	return got
}

// connect dials from a pod with a chosen source address (which it adds to
// the pod's interface first, as a pod with NET_ADMIN could), and says
// whether TCP connected and whether a UDP datagram arrived.
func connect(t *testing.T, pod ns.NetNS, src, dst netip.Addr, udpGot <-chan netip.Addr) (tcpErr error, udpArrived bool) {
	t.Helper()
	bits := 32
	if src.Is6() {
		bits = 128
	}
	// Fails harmlessly when the pod has the address already.
	_ = osexec.Command("ip", "-n", nettest.Name(pod), "addr", "add", fmt.Sprintf("%s/%d", src, bits), "dev", "eth0", "nodad").Run()
	nettest.Do(t, pod, func() error {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 1500 * time.Millisecond}
		c, err := d.Dial("tcp", netip.AddrPortFrom(dst, 9000).String())
		if err == nil {
			c.Close()
		}
		tcpErr = err
		u, err := net.DialUDP("udp", &net.UDPAddr{IP: src.AsSlice()}, net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 9000)))
		if err != nil {
			return err
		}
		defer u.Close()
		_, err = u.Write([]byte("hello"))
		return err
	})
	deadline := time.After(1500 * time.Millisecond)
	for {
		select {
		case from := <-udpGot:
			if from == src {
				return tcpErr, true
			}
		case <-deadline:
			return tcpErr, false
		}
	}
}

// TestSpoofedSourcesAreDropped: a pod that sends with another pod's
// address (UDP, which needs no handshake, and TCP) reaches nothing, in
// both families; the same pod with its own address reaches the server
// (which also proves neighbour discovery works), and the drops are
// counted.
func TestSpoofedSourcesAreDropped(t *testing.T) {
	addrs := map[string][2]string{"x/a": {"10.244.1.2", "fd00:10:244:1::2"}, "x/b": {"10.244.1.3", "fd00:10:244:1::3"}, "x/c": {"10.244.1.4", "fd00:10:244:1::4"}}
	pn := wirePods(t, addrs)
	h := startLoopIn(t, pn.node, Config{IPv6: true, ResyncPeriod: 200 * time.Millisecond}, nil, pn.eps, apiPods(addrs)...)
	for fi, fam := range []string{"4", "6"} {
		got := serve(t, pn.pods["x/c"], fam)
		a, b, c := netip.MustParseAddr(addrs["x/a"][fi]), netip.MustParseAddr(addrs["x/b"][fi]), netip.MustParseAddr(addrs["x/c"][fi])
		if err, udp := connect(t, pn.pods["x/a"], a, c, got); err != nil || !udp {
			t.Fatalf("ipv%s control: a with its own address: tcp %v, udp arrived %v", fam, err, udp)
		}
		before := spoofDrops(h, fam)
		if err, udp := connect(t, pn.pods["x/a"], b, c, got); err == nil || udp {
			t.Errorf("ipv%s: a posing as b reached c: tcp %v, udp arrived %v", fam, err, udp)
		}
		outside := netip.MustParseAddr([]string{"198.18.0.7", "2001:db8::7"}[fi])
		if err, udp := connect(t, pn.pods["x/a"], outside, c, got); err == nil || udp {
			t.Errorf("ipv%s: a posing as an outside address reached c: tcp %v, udp arrived %v", fam, err, udp)
		}
		h.waitFor("the drops counted", func(Status) bool { return spoofDrops(h, fam) > before })
	}
}

func spoofDrops(h *loopHarness, fam string) float64 {
	return testutil.ToFloat64(metrics.SpoofedPacketsDropped.WithLabelValues("ipv" + fam))
}

// TestDenyIsDropNotReject: a denied TCP connect times out, as the public
// NetworkPolicy conformance suites expect, rather than being refused; the
// same connect before the deny succeeds.
func TestDenyIsDropNotReject(t *testing.T) {
	addrs := map[string][2]string{"x/a": {"10.244.1.2", "fd00:10:244:1::2"}, "x/c": {"10.244.1.4", "fd00:10:244:1::4"}}
	pn := wirePods(t, addrs)
	h := startLoopIn(t, pn.node, Config{IPv6: true}, nil, pn.eps, apiPods(addrs)...)
	got := serve(t, pn.pods["x/c"], "4")
	a, c := netip.MustParseAddr(addrs["x/a"][0]), netip.MustParseAddr(addrs["x/c"][0])
	if err, _ := connect(t, pn.pods["x/a"], a, c, got); err != nil {
		t.Fatalf("control: connect before the deny: %v", err)
	}
	h.create(netpol("x", "deny", selects("pod", "c")))
	h.waitFor("the deny", func(s Status) bool { return s.Selected["x/deny"] == 1 })
	err, udp := connect(t, pn.pods["x/a"], a, c, got)
	var ne net.Error
	switch {
	case err == nil || udp:
		t.Fatalf("the denied connect went through: tcp %v, udp %v", err, udp)
	case errors.Is(err, syscall.ECONNREFUSED):
		t.Fatalf("the deny refused the connect (REJECT); it must time out: %v", err)
	case !errors.As(err, &ne) || !ne.Timeout():
		t.Fatalf("the denied connect failed otherwise than by timing out: %v", err)
	}
	if kernel := h.save(); strings.Contains(kernel, "REJECT") {
		t.Errorf("a rule rejects:\n%s", kernel)
	}
}

// TestHooksRepairedByThePolicyLoop: the jumps into the policy chains and
// anti-spoofing come back when a firewall reload flushes FORWARD, or the
// whole raw table, with no overlay loop running.
func TestHooksRepairedByThePolicyLoop(t *testing.T) {
	h := startLoop(t, Config{ResyncPeriod: 200 * time.Millisecond}, nil, apiObjects()...)
	node := nettest.Name(h.ns)
	for _, c := range []struct {
		name   string
		break_ []string
	}{
		{"FORWARD flushed", []string{"iptables-nft", "-F", "FORWARD"}},
		{"raw table flushed", []string{"sh", "-c", "iptables-nft -t raw -F && iptables-nft -t raw -X"}},
		{"filter table flushed", []string{"sh", "-c", "iptables-nft -F && iptables-nft -X"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := testutil.ToFloat64(metrics.DriftRepairs.WithLabelValues("policy-hook"))
			nettest.Run(t, "ip", append([]string{"netns", "exec", node}, c.break_...)...)
			deadline := time.Now().Add(10 * time.Second)
			for {
				filter := nettest.Run(t, "ip", "netns", "exec", node, "iptables-nft-save", "-t", "filter")
				raw := nettest.Run(t, "ip", "netns", "exec", node, "iptables-nft-save", "-t", "raw")
				hs := checkHooks(filter, raw)
				if hs.problem == "" && strings.Contains(filter, "-A "+EndpointChain(vethOf("x/a"), false)) {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("not repaired within 10 s: %s", hs.problem)
				}
				time.Sleep(100 * time.Millisecond)
			}
			h.waitFor("the repair counted", func(Status) bool {
				return testutil.ToFloat64(metrics.DriftRepairs.WithLabelValues("policy-hook")) > before
			})
		})
	}
}

// apiPods is namespace x and its pods with their addresses.
func apiPods(addrs map[string][2]string) []runtime.Object {
	objs := []runtime.Object{&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "x", Labels: map[string]string{"ns": "x"}}}}
	for key, a := range addrs {
		objs = append(objs, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: key[:1], Name: key[2:], UID: types.UID("uid-" + key), ResourceVersion: "1", Labels: map[string]string{"pod": key[2:]}},
			Spec:       corev1.PodSpec{NodeName: "node-1"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: a[0], PodIPs: []corev1.PodIP{{IP: a[0]}, {IP: a[1]}}},
		})
	}
	return objs
}
