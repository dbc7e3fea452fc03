package overlaye2e

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/sluice-net/sluice/test/labtest"
)

// handBuilt is the limit: kernel VXLAN between node-1 and node-2 built by
// hand with ip(8), the same shape as Sluice's (a VXLAN device, a static
// neighbour and FDB entry, /32 pod routes), on its own VNI and port.
type handBuilt struct {
	pods [2]string // namespace names
}

func run(b *testing.B, argv ...string) {
	b.Helper()
	if out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput(); err != nil {
		b.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
}

func buildHandMade(b *testing.B) *handBuilt {
	rnd := make([]byte, 3)
	_, _ = rand.Read(rnd)
	h := &handBuilt{}
	nodes := shared.Nodes[:2]
	for i := range nodes {
		h.pods[i] = "slbench-" + hex.EncodeToString(rnd) + fmt.Sprint(i)
	}
	b.Cleanup(func() {
		for i, n := range nodes {
			_ = exec.Command("ip", "netns", "del", h.pods[i]).Run()
			_ = exec.Command("ip", "-n", n.NetNS, "link", "del", "hbvx").Run()
		}
	})
	for i, n := range nodes {
		x, pod := i+1, h.pods[i]
		run(b, "ip", "netns", "add", pod)
		run(b, "ip", "-n", n.NetNS, "link", "add", "hb0", "type", "veth", "peer", "name", "eth0", "netns", pod)
		run(b, "ip", "-n", pod, "addr", "add", fmt.Sprintf("10.77.%d.2/32", x), "dev", "eth0")
		run(b, "ip", "-n", pod, "link", "set", "eth0", "mtu", "1450", "up")
		run(b, "ip", "-n", pod, "link", "set", "lo", "up")
		run(b, "ip", "-n", pod, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
		run(b, "ip", "-n", pod, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
		run(b, "ip", "-n", n.NetNS, "link", "set", "hb0", "up")
		run(b, "ip", "netns", "exec", n.NetNS, "sysctl", "-qw", "net.ipv4.conf.hb0.proxy_arp=1")
		run(b, "ip", "-n", n.NetNS, "route", "add", fmt.Sprintf("10.77.%d.2/32", x), "dev", "hb0")
		run(b, "ip", "-n", n.NetNS, "link", "add", "hbvx", "address", fmt.Sprintf("0e:77:00:00:00:0%d", x), "type", "vxlan",
			"id", "77", "local", n.IP4, "dev", "eth0", "dstport", "4790", "nolearning")
		run(b, "ip", "-n", n.NetNS, "link", "set", "hbvx", "mtu", "1450", "up")
		run(b, "ip", "-n", n.NetNS, "addr", "add", fmt.Sprintf("10.77.%d.0/32", x), "dev", "hbvx")
	}
	for i, n := range nodes {
		peer := nodes[1-i]
		y := 2 - i
		mac := fmt.Sprintf("0e:77:00:00:00:0%d", y)
		run(b, "ip", "-n", n.NetNS, "neigh", "add", fmt.Sprintf("10.77.%d.0", y), "lladdr", mac, "dev", "hbvx", "nud", "permanent")
		run(b, "bridge", "-n", n.NetNS, "fdb", "append", mac, "dev", "hbvx", "dst", peer.IP4, "self", "permanent")
		run(b, "ip", "-n", n.NetNS, "route", "add", fmt.Sprintf("10.77.%d.0/24", y), "via", fmt.Sprintf("10.77.%d.0", y), "dev", "hbvx", "onlink")
	}
	return h
}

type nsPlace string

func (p nsPlace) Command(argv ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", string(p)}, argv...)...)
}

// BenchmarkOverlayThroughput measures one TCP flow with iperf3 three ways
// in the same run: (a) node to node over the underlay, (b) the hand-built
// kernel VXLAN path, (c) pod to pod across nodes over Sluice.
func BenchmarkOverlayThroughput(b *testing.B) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("iperf3 is not installed (apt-get install iperf3)")
	}
	n1, _ := shared.Resolve("node-1")
	n2, _ := shared.Resolve("node-2")
	podA, _ := shared.Resolve("ov/a")
	podB, _ := shared.Resolve("ov/b")
	bIP, err := shared.ResolveTarget("ov/b", false)
	if err != nil {
		b.Fatal(err)
	}
	hand := buildHandMade(b)
	var sa, sb, sc float64
	for i := 0; i < b.N; i++ {
		sa += labtest.Iperf(b, n2, n1, shared.Nodes[1].IP4)
		sb += labtest.Iperf(b, nsPlace(hand.pods[1]), nsPlace(hand.pods[0]), "10.77.2.2")
		sc += labtest.Iperf(b, podB, podA, bIP)
	}
	n := float64(b.N)
	b.ReportMetric(sa/n, "a-underlay-Gbps")
	b.ReportMetric(sb/n, "b-handbuilt-vxlan-Gbps")
	b.ReportMetric(sc/n, "c-sluice-Gbps")
	b.ReportMetric(sc/sb, "c/b")
	b.ReportMetric(sc/sa, "c/a")
}
