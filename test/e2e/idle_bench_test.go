package e2e

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// idleWindow is how long each agent's CPU time is sampled.
const idleWindow = 30 * time.Second

// userHZ is the unit of utime and stime in /proc/PID/stat; Linux reports
// them in USER_HZ, which is 100 on every architecture.
const userHZ = 100

type idleResult struct {
	rssMean, rssMax, cpuMean, cpuMax, cpuSelfMean float64
	err                                           error
}

var (
	idleOnce     sync.Once
	idleMeasured idleResult
)

// BenchmarkAgentIdle reports sluiced's resident memory (VmRSS) and CPU use
// (percent of one core over 30 s) on each node of a
// 3-node dual-stack lab with two pods per node and three NetworkPolicies,
// once the agents have settled. The lab is measured once, whatever b.N:
// the numbers are levels, not per-operation costs. cpu-% counts the
// agent's own time and that of the iptables-save, iptables-restore and
// ethtool runs it waited for (cutime+cstime): they are its resyncs' cost
// too. cpu-self-% is the Go process alone.
func BenchmarkAgentIdle(b *testing.B) {
	idleOnce.Do(func() { idleMeasured = measureIdle() })
	r := idleMeasured
	if r.err != nil {
		b.Fatal(r.err)
	}
	b.ReportMetric(r.rssMean, "rss-MiB")
	b.ReportMetric(r.rssMax, "rss-max-MiB")
	b.ReportMetric(r.cpuMean, "cpu-%")
	b.ReportMetric(r.cpuMax, "cpu-max-%")
	b.ReportMetric(r.cpuSelfMean, "cpu-self-%")
}

func measureIdle() idleResult {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l, err := labtest.Start(lab.Options{Nodes: 3, IPv6: true, CNI: lab.CNISluice})
	if err != nil {
		return idleResult{err: err}
	}
	defer l.Stop()
	for i, n := range l.Nodes {
		for j := 0; j < 2; j++ {
			app := []string{"web", "db"}[j]
			if _, err := l.CreatePod(ctx, labtest.PodSpec{Namespace: "idle", Name: fmt.Sprintf("%s-%d", app, i+1), Node: n.Name,
				Labels: map[string]string{"app": app}, Ports: []corev1.ContainerPort{{ContainerPort: 80}}}); err != nil {
				return idleResult{err: err}
			}
		}
	}
	from := func(app string) []networkingv1.NetworkPolicyPeer {
		return []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": app}}}}
	}
	http := intstr.FromInt32(80)
	port80 := []networkingv1.NetworkPolicyPort{{Port: &http}}
	for _, np := range []*networkingv1.NetworkPolicy{
		{ObjectMeta: metav1.ObjectMeta{Name: "default-deny"}, Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "web-from-anywhere"}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Ingress:     []networkingv1.NetworkPolicyIngressRule{{Ports: port80}}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "db-from-web"}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}},
			Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: from("web"), Ports: port80}}}},
	} {
		if _, err := l.Client.NetworkingV1().NetworkPolicies("idle").Create(ctx, np, metav1.CreateOptions{}); err != nil {
			return idleResult{err: err}
		}
	}
	// Settled: the policy works end to end (web reaches db, db does not
	// reach db), then a quiet spell longer than the resync period.
	if got, err := l.ProbeEventually("idle/web-1", "idle/db-2", 80, false, false, time.Minute); err != nil || got != "idle/db-2" {
		return idleResult{err: fmt.Errorf("web-1 -> db-2 under policy: %q %v", got, err)}
	}
	if !labtest.Eventually(time.Minute, func() bool { _, err := l.Probe("idle/db-1", "idle/db-3", 80, false, false); return err != nil }) {
		return idleResult{err: fmt.Errorf("db-1 still reaches db-3: the policy never took effect")}
	}
	time.Sleep(15 * time.Second)

	pids := map[string]int{}
	start, startSelf := map[string]int64{}, map[string]int64{}
	for _, n := range l.Nodes {
		pid, err := l.AgentPID(n.Name)
		if err != nil {
			return idleResult{err: err}
		}
		pids[n.Name] = pid
		if start[n.Name], startSelf[n.Name], err = cpuTicks(pid); err != nil {
			return idleResult{err: err}
		}
	}
	t0 := time.Now()
	time.Sleep(idleWindow)
	elapsed := time.Since(t0).Seconds()
	var r idleResult
	for _, n := range l.Nodes {
		end, endSelf, err := cpuTicks(pids[n.Name])
		if err != nil {
			return idleResult{err: fmt.Errorf("%s: the agent restarted or died during the window: %w", n.Name, err)}
		}
		cpu := float64(end-start[n.Name]) / userHZ / elapsed * 100
		r.cpuSelfMean += float64(endSelf-startSelf[n.Name]) / userHZ / elapsed * 100 / float64(len(l.Nodes))
		rss, err := rssMiB(pids[n.Name])
		if err != nil {
			return idleResult{err: err}
		}
		r.cpuMean += cpu / float64(len(l.Nodes))
		r.rssMean += rss / float64(len(l.Nodes))
		r.cpuMax, r.rssMax = max(r.cpuMax, cpu), max(r.rssMax, rss)
	}
	return r
}

// cpuTicks is a process's CPU time in USER_HZ ticks: with its waited-for
// children (utime+stime+cutime+cstime), and alone (utime+stime).
func cpuTicks(pid int) (total, self int64, err error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// Fields after the command name, which may hold spaces: state is
	// field 3, utime 14, stime 15, cutime 16, cstime 17.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 15 {
		return 0, 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	var t [4]int64
	for i := range t {
		if t[i], err = strconv.ParseInt(f[11+i], 10, 64); err != nil {
			return 0, 0, fmt.Errorf("parsing /proc/%d/stat: %w", pid, err)
		}
	}
	return t[0] + t[1] + t[2] + t[3], t[0] + t[1], nil
}

// rssMiB is VmRSS from /proc/PID/status.
func rssMiB(pid int) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
			if err != nil {
				return 0, fmt.Errorf("VmRSS of %d: %w", pid, err)
			}
			return kb / 1024, nil
		}
	}
	return 0, fmt.Errorf("no VmRSS for %d", pid)
}
