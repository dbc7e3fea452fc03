package policye2e

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/policy"
	"github.com/sluice-net/sluice/test/labtest"
)

// followDrops runs sluicectl drops -f over the lab and sends its lines to
// the channel until the test ends.
func followDrops(t testing.TB, args ...string) <-chan string {
	t.Helper()
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bins+"/sluicectl", append([]string{"drops", "-f", "--lab-dir", shared.Dir}, args...)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = cmd.Wait() })
	return scanLines(out)
}

// scanLines sends a reader's lines to a channel, dropping them when the
// test stopped reading.
func scanLines(r io.Reader) <-chan string {
	lines := make(chan string, 1024)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			select {
			case lines <- sc.Text():
			default:
			}
		}
	}()
	return lines
}

// waitLine waits for a line holding every want, and returns it and when
// it came; "" when none did in time.
func waitLine(lines <-chan string, timeout time.Duration, want ...string) (string, time.Time) {
	deadline := time.After(timeout)
	for {
		select {
		case l := <-lines:
			ok := true
			for _, w := range want {
				ok = ok && strings.Contains(l, w)
			}
			if ok {
				return l, time.Now()
			}
		case <-deadline:
			return "", time.Time{}
		}
	}
}

func denyX(t testing.TB) {
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "deny"}}
	if _, err := shared.Client.NetworkingV1().NetworkPolicies("x").Create(context.Background(), np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = shared.Client.NetworkingV1().NetworkPolicies("x").Delete(context.Background(), "deny", metav1.DeleteOptions{})
	})
}

// TestDropsFollowShowsADeniedConnection: with x isolated, a connection
// from z/a to x/a shows in sluicectl drops -f, from every node, with the
// pod, the direction and the end of the default tier that denied it. The
// control: an allowed connection (z/a to y/a) shows nothing.
func TestDropsFollowShowsADeniedConnection(t *testing.T) {
	denyX(t)
	checkTable(t, "x denied", []int32{80}, []policy.Protocol{policy.TCP})
	lines := followDrops(t, "-o", "json")
	time.Sleep(500 * time.Millisecond) // the followers are connected
	za, _ := shared.ResolveTarget("z/a", false)
	ya, _ := shared.ResolveTarget("y/a", false)
	start := time.Now()
	if _, err := shared.Probe("z/a", "y/a", 80, false, false); err != nil {
		t.Fatalf("control: z/a -> y/a: %v", err)
	}
	probed := make(chan error, 1)
	go func() { _, err := shared.Probe("z/a", "x/a", 80, false, false); probed <- err }()
	var got *policy.Drop
	var at time.Time
	deadline := time.After(10 * time.Second)
	for got == nil {
		select {
		case l := <-lines:
			var d policy.Drop
			if json.Unmarshal([]byte(l), &d) != nil || d.Time.Before(start) {
				continue // history from before this test
			}
			if d.Src == za && d.Dst == ya {
				t.Errorf("an allowed connection shows as dropped: %+v", d)
			}
			if d.Src == za && d.Pod == "x/a" {
				got, at = &d, time.Now()
			}
		case <-deadline:
			t.Fatal("sluicectl drops -f did not show the denied connection")
		}
	}
	if err := <-probed; err == nil {
		t.Fatal("z/a -> x/a passed under deny")
	}
	if got.Direction != "ingress" || got.Protocol != "TCP" || got.Port != 80 || got.Tier != "default" || got.Policy != "" ||
		got.Reason != "isolated, no rule allowed it (end of tier default)" {
		t.Errorf("the drop is not attributed right: %+v", got)
	}
	t.Logf("shown %d ms after the packet was dropped: %+v", at.Sub(got.Time).Milliseconds(), *got)
}

// BenchmarkDropLogFlood floods x/a with 10,000 denied UDP packets a
// second for 10 s from z/a and reports the CPU the agent on x/a's node
// spent, from /proc, next to the same 10 s without the flood; a denied
// connection from z/b to x/b during the flood must still be logged.
func BenchmarkDropLogFlood(b *testing.B) {
	denyX(b)
	_, node, err := shared.FindPod("x/a")
	if err != nil {
		b.Fatal(err)
	}
	pid, err := shared.AgentPID(node.Name)
	if err != nil || pid == 0 {
		b.Fatalf("agent of %s: %d %v", node.Name, pid, err)
	}
	time.Sleep(3 * time.Second) // the policy is programmed
	idle := cpuOver(b, pid, 10*time.Second, func() {})
	lines := followDrops(b, "-n", "x")
	zb, _ := shared.ResolveTarget("z/b", false)
	sent := make(chan int, 1)
	flood := cpuOver(b, pid, 10*time.Second, func() {
		go func() { sent <- floodUDP(b, "z/a", "x/a", 10000, 10*time.Second) }()
		time.Sleep(5 * time.Second)
		_, _ = shared.Probe("z/b", "x/b", 80, false, false)
	})
	if l, _ := waitLine(lines, 5*time.Second, zb+" → ", "x/b", "denied"); l == "" {
		b.Error("the flood made the agent lose the drop of z/b -> x/b")
	}
	n := <-sent
	b.ReportMetric(float64(n)/10, "pps-sent")
	b.ReportMetric(100*flood, "%core-flood")
	b.ReportMetric(100*idle, "%core-idle")
	b.Logf("agent CPU over 10 s: %.2f%% of a core under a 10k pps denied flood, %.2f%% without", 100*flood, 100*idle)
}

// cpuOver runs fn and returns the share of one core the process used
// over d from its start.
func cpuOver(b testing.TB, pid int, d time.Duration, fn func()) float64 {
	before := cpuTicks(b, pid)
	t0 := time.Now()
	fn()
	time.Sleep(d - time.Since(t0))
	return float64(cpuTicks(b, pid)-before) / 100 / time.Since(t0).Seconds() // USER_HZ is 100
}

func cpuTicks(b testing.TB, pid int) int64 {
	raw, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		b.Fatal(err)
	}
	// The fields after the command name, which is in parentheses.
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+2:]))
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return utime + stime
}

// floodUDP sends pps UDP packets (and returns how many it sent) a second from one pod to another's port
// 80 for d, in bursts every 10 ms, from fresh source ports so that every
// packet is a new connection to conntrack.
func floodUDP(b testing.TB, from, to string, pps int, d time.Duration) int {
	place, _ := shared.Resolve(from)
	ip, _ := shared.ResolveTarget(to, false)
	var conns []net.Conn
	err := ns.WithNetNSPath(place.NetNSPath, func(ns.NetNS) error {
		for i := 0; i < 64; i++ {
			c, err := net.Dial("udp", net.JoinHostPort(ip, "80"))
			if err != nil {
				return err
			}
			conns = append(conns, c)
		}
		return nil
	})
	if err != nil {
		b.Error(err)
		return 0
	}
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	msg := []byte("flood")
	n, attempts := 0, 0
	t0 := time.Now()
	for end := t0.Add(d); time.Now().Before(end); <-tick.C {
		// Catch up with the rate when a tick came late.
		for due := int(time.Since(t0).Seconds() * float64(pps)); attempts < due; attempts++ {
			if _, err := conns[attempts%len(conns)].Write(msg); err == nil {
				n++
			}
		}
	}
	return n
}

// BenchmarkDropLogCostOnAllowedTraffic: iperf3 from x/a to y/b, which a
// policy allows into an isolated y (so y/b's chain holds the drop log
// before its end-of-tier drop), with the agents' drop logging on, then off
// (--log-drops=false in the DaemonSet), in the same run.
func BenchmarkDropLogCostOnAllowedTraffic(b *testing.B) {
	if _, err := exec.LookPath("iperf3"); err != nil {
		b.Skip("iperf3 is not installed")
	}
	ctx := context.Background()
	for _, np := range []*networkingv1.NetworkPolicy{
		{ObjectMeta: metav1.ObjectMeta{Namespace: "y", Name: "deny"}},
		{ObjectMeta: metav1.ObjectMeta{Namespace: "y", Name: "from-x"}, Spec: networkingv1.NetworkPolicySpec{
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "x")}}}}}},
	} {
		if _, err := shared.Client.NetworkingV1().NetworkPolicies("y").Create(ctx, np, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		defer shared.Client.NetworkingV1().NetworkPolicies("y").Delete(ctx, np.Name, metav1.DeleteOptions{})
	}
	_, node, err := shared.FindPod("y/b")
	if err != nil {
		b.Fatal(err)
	}
	measure := func(wantLogs bool) float64 {
		waitDropLogRules(b, node.Name, wantLogs)
		if _, err := shared.ProbeEventually("x/a", "y/b", 80, false, false, time.Minute); err != nil {
			b.Fatal(err)
		}
		var runs []float64
		for i := 0; i < 3; i++ {
			runs = append(runs, iperf(b, "x/a", "y/b"))
		}
		sort.Float64s(runs)
		return runs[1]
	}
	with := measure(true)
	patchDropLog(b, false)
	defer func() { patchDropLog(b, true); waitDropLogRules(b, node.Name, true) }()
	without := measure(false)
	b.ReportMetric(with, "droplog-Gbps")
	b.ReportMetric(without, "no-droplog-Gbps")
	b.ReportMetric(with/without, "ratio")
	b.Logf("iperf3 x/a -> y/b, median of 3: %.2f Gb/s with drop logging, %.2f without (%.3fx)", with, without, with/without)
}

// patchDropLog turns the agents' drop logging on or off in the DaemonSet.
func patchDropLog(b *testing.B, on bool) {
	patch := `[{"op":"add","path":"/spec/template/spec/containers/0/command/-","value":"--log-drops=false"}]`
	if on {
		patch = `[{"op":"remove","path":"/spec/template/spec/containers/0/command/5"}]`
	}
	if out, err := shared.Kubectl(context.Background(), "", "-n", "kube-system", "patch", "ds", "sluice", "--type=json", "-p", patch); err != nil {
		b.Fatalf("%v: %s", err, out)
	}
}

// waitDropLogRules waits until a node's rules do (or do not) log drops.
func waitDropLogRules(b *testing.B, node string, want bool) {
	place, err := shared.Resolve(node)
	if err != nil {
		b.Fatal(err)
	}
	for deadline := time.Now().Add(3 * time.Minute); time.Now().Before(deadline); time.Sleep(time.Second) {
		out, _ := place.Command("iptables-save", "-t", "filter").CombinedOutput()
		legacy, _ := place.Command("iptables-legacy-save", "-t", "filter").CombinedOutput()
		out = append(out, legacy...)
		if strings.Contains(string(out), "sluiceDrop") == want && strings.Contains(string(out), "SLUICE-TW-") {
			return
		}
	}
	b.Fatalf("node %s: drop log rules present=%v not reached", node, want)
}
