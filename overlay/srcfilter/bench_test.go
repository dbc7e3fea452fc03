package srcfilter

import (
	"net/netip"
	"os/exec"
	"sort"
	"testing"

	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

// BenchmarkThroughputWithSourceFilter measures one TCP flow from a pod on
// one node to a pod on another across Sluice's VXLAN overlay (iperf3, 3 s),
// alternately without and with the VXLAN source filter on both nodes, in
// the same run. The namespaces' INPUT is otherwise empty, unlike a real
// node's (kube-proxy, the kubelet), so this is the filter's whole cost. It reports the medians and their ratio.
//
//	go test -run '^$' -bench ThroughputWithSourceFilter -benchtime 5x ./overlay/srcfilter/
func BenchmarkThroughputWithSourceFilter(b *testing.B) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("iperf3 is not installed (apt-get install iperf3)")
	}
	for _, f := range fams {
		b.Run(f.name, func(b *testing.B) {
			hosts := lan(b, f, 2)
			server, client := hosts[0], hosts[1]
			addPod(b, f, server)
			addPod(b, f, client)
			program(b, f, server, client)
			program(b, f, client, server)
			samples := map[bool][]float64{}
			for i := 0; i < b.N; i++ {
				// Alternate which goes first, so a drift in the machine's
				// load does not favour one side.
				for _, on := range [][]bool{{false, true}, {true, false}}[i%2] {
					setFilter(b, f, hosts, on)
					samples[on] = append(samples[on], iperf(b, nettest.Name(server.pod), nettest.Name(client.pod), f.pod(server.i)))
				}
			}
			off, on := samples[false], samples[true]
			b.Logf("Gb/s unfiltered %.2f, filtered %.2f", off, on)
			b.ReportMetric(median(off), "unfiltered-Gbps")
			b.ReportMetric(median(on), "filtered-Gbps")
			b.ReportMetric(median(on)/median(off), "filtered/unfiltered")
		})
	}
}

// setFilter puts the filter on every host (all of them known nodes), or
// removes it.
func setFilter(b *testing.B, f fam, hosts []*host, on bool) {
	var known []netip.Addr
	for _, h := range hosts {
		known = append(known, f.underlay(h.i))
	}
	fam := map[bool]iptables.Family{false: iptables.IPv4, true: iptables.IPv6}[f.v6]
	for _, h := range hosts {
		nettest.Do(b, h.ns, func() error {
			r, err := iptables.New(fam, iptables.ModeNFT)
			if err != nil {
				return err
			}
			if !on {
				return Remove(r, f.v6)
			}
			flt := Filter{Port: 8472, IPv6: f.v6}
			if _, err := flt.SyncSet(known); err != nil {
				return err
			}
			return flt.Apply(r)
		})
	}
}

// iperf runs an iperf3 server in one namespace and a 3-second single-flow
// client in another, and returns the received throughput in Gb/s.
func iperf(b *testing.B, serverNS, clientNS string, target netip.Addr) float64 {
	return nettest.Iperf(b, serverNS, clientNS, target.String())
}

func median(xs []float64) float64 {
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
