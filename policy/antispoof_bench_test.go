package policy

import (
	"os/exec"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/nettest"
)

// BenchmarkAntiSpoofCost measures pod-to-pod throughput on one node with
// the reverse-path check and without it (its jump deleted), alternating
// in the same run, and reports the medians and their ratio.
func BenchmarkAntiSpoofCost(b *testing.B) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("iperf3 is not installed")
	}
	quietKlog()
	addrs := map[string][2]string{"x/a": {"10.244.1.2", "fd00:10:244:1::2"}, "x/c": {"10.244.1.4", "fd00:10:244:1::4"}}
	pn := wirePods(b, addrs)
	// No re-read during the run: it would put the deleted jump back.
	startLoopIn(b, pn.node, Config{IPv6: true, ResyncPeriod: time.Hour}, nil, pn.eps, apiPods(addrs)...)
	node := nettest.Name(pn.node)
	toggle := func(op string) {
		nettest.Run(b, "ip", "netns", "exec", node, "iptables-nft", "-t", "raw", op, "PREROUTING", "-m", "comment", "--comment", antiSpoofJump, "-j", PreroutingChain)
	}
	var with, without []float64
	for i := 0; i < b.N; i++ {
		with = append(with, nettest.Iperf(b, nettest.Name(pn.pods["x/c"]), nettest.Name(pn.pods["x/a"]), addrs["x/c"][0]))
		toggle("-D")
		without = append(without, nettest.Iperf(b, nettest.Name(pn.pods["x/c"]), nettest.Name(pn.pods["x/a"]), addrs["x/c"][0]))
		toggle("-I")
	}
	b.ReportMetric(nettest.Median(with), "antispoof-Gbps")
	b.ReportMetric(nettest.Median(without), "none-Gbps")
	b.ReportMetric(nettest.Median(with)/nettest.Median(without), "throughput-ratio")
}
