package policy

import (
	"encoding/json"
	"os/exec"
	"sort"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/nettest"
)

// iperfNS runs a 3-second single-flow iperf3 between two namespaces and
// returns the received throughput in Gb/s.
func iperfNS(b *testing.B, server, client, target string) float64 {
	b.Helper()
	srv := exec.Command("ip", "netns", "exec", server, "iperf3", "-s", "-1", "-p", "5299")
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
	time.Sleep(300 * time.Millisecond)
	out, err := exec.Command("ip", "netns", "exec", client, "iperf3", "-c", target, "-p", "5299", "-t", "3", "-J").Output()
	if err != nil {
		b.Fatalf("iperf3 to %s: %v\n%s", target, err, out)
	}
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		b.Fatalf("iperf3 output: %v", err)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return s[len(s)/2]
}

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
		with = append(with, iperfNS(b, nettest.Name(pn.pods["x/c"]), nettest.Name(pn.pods["x/a"]), addrs["x/c"][0]))
		toggle("-D")
		without = append(without, iperfNS(b, nettest.Name(pn.pods["x/c"]), nettest.Name(pn.pods["x/a"]), addrs["x/c"][0]))
		toggle("-I")
	}
	b.ReportMetric(median(with), "antispoof-Gbps")
	b.ReportMetric(median(without), "none-Gbps")
	b.ReportMetric(median(with)/median(without), "throughput-ratio")
}
