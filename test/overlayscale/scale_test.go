package overlayscale

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

const (
	flannelVersion = "v0.28.10"
	netConf        = `{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}`
	// fakeNodes are Node objects without kubelets; with the lab's node-1
	// (Sluice) and node-2 (flanneld) the cluster has 5,001 nodes.
	fakeNodes = 4999
	firstFake = 3 // node i has 10.(i/256).(i%256).0/24
	joins     = 30
)

func podCIDR(i int) string { return fmt.Sprintf("10.%d.%d.0/24", i/256, i%256) }

func fakeNode(i int) *corev1.Node {
	mac := fmt.Sprintf("0e:5c:%02x:%02x:%02x:%02x", i>>24&0xff, i>>16&0xff, i>>8&0xff, i&0xff)
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("fake-%d", i), Annotations: map[string]string{
			"flannel.alpha.coreos.com/backend-type":        "vxlan",
			"flannel.alpha.coreos.com/backend-data":        fmt.Sprintf(`{"VNI":1,"VtepMAC":"%s"}`, mac),
			"flannel.alpha.coreos.com/kube-subnet-manager": "true",
			"flannel.alpha.coreos.com/public-ip":           fmt.Sprintf("198.19.%d.%d", i/256, i%256),
		}},
		Spec: corev1.NodeSpec{PodCIDR: podCIDR(i), PodCIDRs: []string{podCIDR(i)}},
	}
}

// createFakes creates nodes [from, to) with 8 writers.
func createFakes(b *testing.B, ctx context.Context, l *labtest.Lab, from, to int) {
	cs, err := l.FastClient()
	if err != nil {
		b.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := 0; w < 8; w++ {
		wg.Go(func() {
			for i := from + w; i < to; i += 8 {
				if _, err := cs.CoreV1().Nodes().Create(ctx, fakeNode(i), metav1.CreateOptions{}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		b.Fatal(err)
	}
}

// result is one agent's numbers.
type result struct {
	name               string
	peers              int
	startToProgrammed  time.Duration
	joinP50, joinP99   time.Duration
	leaveP50, leaveP99 time.Duration
	rssMiB, restCPUPct float64
	noopResyncWrites   int
}

// BenchmarkOverlay5000Nodes: Sluice on node-1 and flanneld v0.28.10 on
// node-2, one after the other, against the same 5,001 Nodes: start to all
// peers programmed (route, neighbour and FDB entry each), one node joining
// and leaving (write to programmed, p50/p99 of 30), RSS and CPU at rest,
// and the kernel changes during two resync periods with nothing to do.
func BenchmarkOverlay5000Nodes(b *testing.B) {
	flanneld := filepath.Join(lab.DefaultToolsDir(), "flannel-"+flannelVersion, "flanneld")
	if _, err := os.Stat(flanneld); err != nil {
		b.Skipf("flanneld not built (run 'make tools'): %v", err)
	}
	l, err := labtest.Start(lab.Options{Nodes: 2, CNI: lab.CNIReference, NoPodCIDR: true})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Stop()
	ctx, cancel := context.WithTimeout(context.Background(), 25*time.Minute)
	defer cancel()
	for i, n := range l.Nodes {
		patch := fmt.Sprintf(`{"spec":{"podCIDR":%q,"podCIDRs":[%q]}}`, podCIDR(i+1), podCIDR(i+1))
		if _, err := l.Client.CoreV1().Nodes().Patch(ctx, n.Name, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	t0 := time.Now()
	createFakes(b, ctx, l, firstFake, firstFake+fakeNodes)
	b.Logf("%d Node objects created in %s", fakeNodes, time.Since(t0).Round(time.Second))

	sluice := measureSluice(b, ctx, l)
	flannel := measureFlannel(b, ctx, l, flanneld)
	for _, r := range []result{sluice, flannel} {
		b.Logf("%-8s peers %d, start to programmed %s, join p50 %s p99 %s, leave p50 %s p99 %s, RSS %.1f MiB, CPU at rest %.2f%%, kernel changes on a no-op resync %d",
			r.name, r.peers, r.startToProgrammed.Round(time.Millisecond), r.joinP50, r.joinP99, r.leaveP50, r.leaveP99, r.rssMiB, r.restCPUPct, r.noopResyncWrites)
		b.ReportMetric(r.startToProgrammed.Seconds(), r.name+"-start-to-programmed-s")
		b.ReportMetric(ms(r.joinP99), r.name+"-join-p99-ms")
		b.ReportMetric(ms(r.leaveP99), r.name+"-leave-p99-ms")
		b.ReportMetric(r.rssMiB, r.name+"-rss-MiB")
		b.ReportMetric(r.restCPUPct, r.name+"-rest-cpu-%")
		b.ReportMetric(float64(r.noopResyncWrites), r.name+"-noop-resync-kernel-changes")
	}
	b.ReportMetric(sluice.rssMiB/flannel.rssMiB, "rss-sluice/flanneld")
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func measureSluice(b *testing.B, ctx context.Context, l *labtest.Lab) result {
	r := result{name: "sluice"}
	start := time.Now()
	ag, err := l.StartAgentsOn(netConf, "node-1")
	if err != nil {
		b.Fatal(err)
	}
	defer ag.StopAll()
	r.peers = waitProgrammed(b, l, "node-1", "vx-sluice.1", fakeNodes)
	r.startToProgrammed = time.Since(start)
	pid, err := l.AgentPID("node-1")
	if err != nil || pid == 0 {
		b.Fatalf("no sluiced on node-1: %v", err)
	}
	b.Logf("sluice: %d peers programmed %s after start", r.peers, r.startToProgrammed.Round(time.Millisecond))
	atRest(b, l, "node-1", "vx-sluice.1", pid, 12*time.Second, &r)
	joinLeave(b, ctx, l, "node-1", 6000, &r)
	return r
}

func measureFlannel(b *testing.B, ctx context.Context, l *labtest.Lab, flanneld string) result {
	r := result{name: "flanneld"}
	place, _ := l.Resolve("node-2")
	confPath := l.Path("flannel-net-conf.json")
	if err := os.WriteFile(confPath, []byte(netConf), 0o644); err != nil {
		b.Fatal(err)
	}
	logf, err := os.Create(l.Path("logs", "flanneld.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer logf.Close()
	start := time.Now()
	cmd := place.Command(flanneld, "--kube-subnet-mgr", "--kubeconfig-file", l.NodeKubeconfigAdmin(),
		"--iface", "eth0", "--ip-masq", "--net-config-path", confPath)
	cmd.Env = append(os.Environ(), "NODE_NAME=node-2")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	// flanneld also sees node-1, which Sluice annotated.
	r.peers = waitProgrammed(b, l, "node-2", "flannel.1", fakeNodes+1)
	r.startToProgrammed = time.Since(start)
	b.Logf("flanneld: %d peers programmed %s after start", r.peers, r.startToProgrammed.Round(time.Millisecond))
	atRest(b, l, "node-2", "flannel.1", cmd.Process.Pid, 12*time.Second, &r)
	joinLeave(b, ctx, l, "node-2", 7000, &r)
	return r
}

// waitProgrammed waits until the device has want peers in the kernel.
func waitProgrammed(b *testing.B, l *labtest.Lab, node, device string, want int) int {
	n, _ := l.Node(node)
	path := "/run/netns/" + n.NetNS
	deadline := time.Now().Add(5 * time.Minute)
	for {
		p, err := countPeers(path, device)
		if err != nil {
			b.Fatal(err)
		}
		if p.min() >= want {
			return p.min()
		}
		if time.Now().After(deadline) {
			b.Fatalf("%s: %s has %+v after 5 minutes, want %d of each", node, device, p, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// atRest settles, then measures RSS, CPU over a window and the kernel
// changes on the tunnel device (ip and bridge monitor) in that window.
func atRest(b *testing.B, l *labtest.Lab, node, device string, pid int, window time.Duration, r *result) {
	time.Sleep(10 * time.Second)
	var mons []*exec.Cmd
	var outs []*strings.Builder
	for _, argv := range [][]string{{"ip", "monitor", "route", "neigh", "link"}, {"bridge", "monitor", "fdb"}} {
		place, _ := l.Resolve(node)
		cmd := place.Command(argv...)
		out := &strings.Builder{}
		cmd.Stdout = out
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		mons, outs = append(mons, cmd), append(outs, out)
	}
	c0, _ := cpuSeconds(pid)
	t0 := time.Now()
	time.Sleep(window)
	c1, _ := cpuSeconds(pid)
	r.restCPUPct = 100 * (c1 - c0) / time.Since(t0).Seconds()
	for i, m := range mons {
		_ = m.Process.Kill()
		_ = m.Wait()
		for _, line := range strings.Split(outs[i].String(), "\n") {
			if strings.Contains(line, device) {
				r.noopResyncWrites++
			}
		}
	}
	var err error
	if r.rssMiB, err = rssMiB(pid); err != nil {
		b.Fatal(err)
	}
}

// joinLeave creates and deletes nodes one at a time and times each write
// to its route's appearance and disappearance on node.
func joinLeave(b *testing.B, ctx context.Context, l *labtest.Lab, node string, base int, r *result) {
	n, _ := l.Node(node)
	path := "/run/netns/" + n.NetNS
	cs, err := l.FastClient() // no client-side rate limit in the timings
	if err != nil {
		b.Fatal(err)
	}
	var join, leave []time.Duration
	for k := 0; k < joins; k++ {
		fake := fakeNode(base + k)
		_, dst, _ := net.ParseCIDR(podCIDR(base + k))
		t0 := time.Now()
		if _, err := cs.CoreV1().Nodes().Create(ctx, fake, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		join = append(join, waitRoute(b, path, dst, true, t0))
		t0 = time.Now()
		if err := cs.CoreV1().Nodes().Delete(ctx, fake.Name, metav1.DeleteOptions{}); err != nil {
			b.Fatal(err)
		}
		leave = append(leave, waitRoute(b, path, dst, false, t0))
	}
	r.joinP50, r.joinP99 = pct(join, 50), pct(join, 99)
	r.leaveP50, r.leaveP99 = pct(leave, 50), pct(leave, 99)
}

func waitRoute(b *testing.B, path string, dst *net.IPNet, present bool, t0 time.Time) time.Duration {
	for {
		ok, err := hasRoute(path, dst)
		if err != nil {
			b.Fatal(err)
		}
		if ok == present {
			return time.Since(t0).Round(100 * time.Microsecond)
		}
		if time.Since(t0) > time.Minute {
			b.Fatalf("route %s present=%v not reached in a minute", dst, present)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func pct(d []time.Duration, p int) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, len(s)*p/100)]
}
