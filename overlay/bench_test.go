package overlay

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/sluice-net/sluice/internal/nettest"
)

// handWireGuard is the limit for Sluice's userspace WireGuard: the same
// library, configured by hand between the same two node namespaces, with
// a second address on each pod (10.77.N.2) routed through it.
func handWireGuard(b *testing.B, c *nsCluster) {
	keys := [2]wgtypes.Key{}
	for i := range keys {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			b.Fatal(err)
		}
		keys[i] = k
	}
	for i, n := range c.nodes[:2] {
		peer := c.nodes[1-i]
		x, px := i+1, 2-i
		nettest.Run(b, "ip", "-n", nettest.Name(n.pod), "addr", "add", fmt.Sprintf("10.77.%d.2/32", x), "dev", "eth0")
		nettest.Run(b, "ip", "-n", nettest.Name(n.netns), "route", "add", fmt.Sprintf("10.77.%d.2/32", x), "dev", "slpod")
		var dev *device.Device
		nettest.Do(b, n.netns, func() error {
			t, err := tun.CreateTUN("hbwg", 1440)
			if err != nil {
				return err
			}
			dev = device.NewDevice(t, conn.NewDefaultBind(), device.NewLogger(device.LogLevelSilent, ""))
			pub := keys[1-i].PublicKey()
			cfg := fmt.Sprintf("private_key=%x\nlisten_port=51999\npublic_key=%x\nendpoint=%s:51999\nallowed_ip=10.77.%d.0/24\n",
				keys[i][:], pub[:], peer.ip, px)
			if err := dev.IpcSet(cfg); err != nil {
				return err
			}
			return dev.Up()
		})
		b.Cleanup(dev.Close)
		nettest.Run(b, "ip", "-n", nettest.Name(n.netns), "link", "set", "hbwg", "up")
		nettest.Run(b, "ip", "-n", nettest.Name(n.netns), "route", "add", fmt.Sprintf("10.77.%d.0/24", px), "dev", "hbwg")
	}
}

// iperfFrom is nettest.Iperf with the client bound to a source address.
func iperfFrom(b *testing.B, server, client, target, source string) float64 {
	b.Helper()
	srv := exec.Command("ip", "netns", "exec", server, "iperf3", "-s", "-1", "-p", "5299")
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
	time.Sleep(300 * time.Millisecond)
	out, err := exec.Command("ip", "netns", "exec", client, "iperf3", "-c", target, "-B", source, "-p", "5299", "-t", "3", "-J").Output()
	if err != nil {
		b.Fatalf("iperf3 to %s: %v\n%s", target, err, out)
	}
	gbps, err := nettest.IperfGbps(out)
	if err != nil {
		b.Fatal(err)
	}
	return gbps
}

// busyCPU reads the machine's busy CPU time (all cores, every process and
// softirq) from /proc/stat, in seconds.
func busyCPU(b *testing.B) float64 {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		b.Fatal(err)
	}
	f := strings.Fields(strings.SplitN(string(raw), "\n", 2)[0])[1:]
	var busy float64
	for i, v := range f {
		n, _ := strconv.ParseFloat(v, 64)
		if i != 3 && i != 4 { // idle, iowait
			busy += n
		}
	}
	return busy / 100 // USER_HZ
}

// BenchmarkWireGuardThroughput measures one TCP flow pod to pod across
// nodes, in one run: (a) the underlay, (b) a hand-built userspace
// WireGuard tunnel, (c) Sluice with wireguard (userspace) and (d) Sluice
// with VXLAN. It reports medians (Gb/s), the medians of each round's c/b
// and c/d, and the CPU cores the machine was busy per Gb/s of each.
func BenchmarkWireGuardThroughput(b *testing.B) {
	wg := startCluster(b, 2, wgNetConf, time.Minute)
	vx := startCluster(b, 2, `{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}`, time.Minute)
	handWireGuard(b, wg)
	n1, n2 := wg.nodes[0], wg.nodes[1]
	cases := []struct {
		name string
		run  func() float64
	}{
		{"underlay", func() float64 {
			return nettest.Iperf(b, nettest.Name(n2.netns), nettest.Name(n1.netns), n2.ip.String())
		}},
		{"hand-wireguard", func() float64 {
			return iperfFrom(b, nettest.Name(n2.pod), nettest.Name(n1.pod), "10.77.2.2", "10.77.1.2")
		}},
		{"sluice-wireguard", func() float64 { return nettest.Iperf(b, nettest.Name(n2.pod), nettest.Name(n1.pod), n2.podIP.String()) }},
		{"sluice-vxlan", func() float64 {
			return nettest.Iperf(b, nettest.Name(vx.nodes[1].pod), nettest.Name(vx.nodes[0].pod), vx.nodes[1].podIP.String())
		}},
	}
	gbps := map[string][]float64{}
	cpu := map[string][]float64{}
	var cb, cd []float64
	b.ResetTimer()
	// Rounds interleave the cases, so a burst of load elsewhere on the
	// machine hits all of them, and the ratios are medians of each round's
	// ratio; run with -benchtime 1x.
	for i := 0; i < max(b.N, 9); i++ {
		round := map[string]float64{}
		for _, c := range cases {
			start, t0 := busyCPU(b), time.Now()
			g := c.run()
			cores := (busyCPU(b) - start) / time.Since(t0).Seconds()
			gbps[c.name] = append(gbps[c.name], g)
			cpu[c.name] = append(cpu[c.name], cores/g)
			round[c.name] = g
		}
		cb = append(cb, round["sluice-wireguard"]/round["hand-wireguard"])
		cd = append(cd, round["sluice-wireguard"]/round["sluice-vxlan"])
	}
	b.StopTimer()
	med := func(name string) float64 { return nettest.Median(gbps[name]) }
	for _, c := range cases {
		b.ReportMetric(med(c.name), c.name+"-Gb/s")
		b.ReportMetric(nettest.Median(cpu[c.name]), c.name+"-cores/Gb/s")
		b.Logf("%s: %v Gb/s, cores per Gb/s %v", c.name, gbps[c.name], cpu[c.name])
	}
	b.Logf("c/b per round %v, c/d per round %v", cb, cd)
	b.ReportMetric(nettest.Median(cb), "c/b")
	b.ReportMetric(nettest.Median(cd), "c/d")
}

// connectMillis returns the median time, in ms, of n TCP connects with one
// echoed byte from one pod to another.
func connectMillis(b *testing.B, from, to *nsNode, port, n int) float64 {
	var samples []float64
	for i := 0; i < n; i++ {
		start := time.Now()
		conn, err := dial(from.pod, netip.AddrPortFrom(to.podIP, uint16(port)))
		if err != nil {
			b.Fatal(err)
		}
		err = echo(conn, "x", 3*time.Second)
		conn.Close()
		if err != nil {
			b.Fatal(err)
		}
		samples = append(samples, float64(time.Since(start).Microseconds())/1000)
	}
	return nettest.Median(samples)
}

// BenchmarkWireGuardConnect measures TCP connect and first byte pod to pod
// across nodes over Sluice's userspace WireGuard and over VXLAN, in one
// run, interleaved: medians of 200 connects per round, five rounds.
func BenchmarkWireGuardConnect(b *testing.B) {
	wg := startCluster(b, 2, wgNetConf, time.Minute)
	vx := startCluster(b, 2, `{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}`, time.Minute)
	listen(b, wg.nodes[1].pod, 8080)
	listen(b, vx.nodes[1].pod, 8080)
	// The first connect over WireGuard waits for the handshake; steady
	// state is measured.
	connectMillis(b, wg.nodes[0], wg.nodes[1], 8080, 5)
	var wgMs, vxMs []float64
	b.ResetTimer()
	for i := 0; i < max(b.N, 5); i++ {
		wgMs = append(wgMs, connectMillis(b, wg.nodes[0], wg.nodes[1], 8080, 200))
		vxMs = append(vxMs, connectMillis(b, vx.nodes[0], vx.nodes[1], 8080, 200))
	}
	b.StopTimer()
	b.Logf("wireguard ms %v, vxlan ms %v", wgMs, vxMs)
	b.ReportMetric(nettest.Median(wgMs), "wireguard-connect-ms")
	b.ReportMetric(nettest.Median(vxMs), "vxlan-connect-ms")
	b.ReportMetric(nettest.Median(wgMs)/nettest.Median(vxMs), "wireguard/vxlan")
}
