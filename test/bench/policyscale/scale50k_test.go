package policyscale

import (
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/sluice-net/sluice/test/labtest"
)

// BenchmarkProgrammingAt50000Pods is BenchmarkProgrammingAtScale at issue
// 18's scale: 50,000 pods in 100 namespaces (200 of them local endpoints
// on node-1), 10,000 policies. The target pod is selected by 100 of them.
func BenchmarkProgrammingAt50000Pods(b *testing.B) {
	saved := [4]int{namespaces, localPods, totalPods, policies}
	defer func() { namespaces, localPods, totalPods, policies = saved[0], saved[1], saved[2], saved[3] }()
	namespaces, localPods, totalPods, policies = 100, 200, 50000, 10000
	programmingAtScale(b)
}

// reportFootprint reports the agent's RSS and what it keeps in the
// node's kernel: ipsets, their members, and rules in Sluice's chains.
func reportFootprint(b *testing.B, l *labtest.Lab, node string) {
	pid, err := l.AgentPID(node)
	if err != nil || pid == 0 {
		b.Logf("no agent on %s to measure: %v", node, err)
		return
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err == nil {
		for _, line := range strings.Split(string(status), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 64)
				b.ReportMetric(kb/1024, "agent-rss-MiB")
			}
		}
	}
	if out, err := l.Exec(node, "ipset", "save"); err == nil {
		sets, members := 0, 0
		for _, line := range strings.Split(out, "\n") {
			switch {
			case strings.HasPrefix(line, "create SLUICE"):
				sets++
			case strings.HasPrefix(line, "add SLUICE"):
				members++
			}
		}
		b.ReportMetric(float64(sets), "ipsets")
		b.ReportMetric(float64(members), "ipset-members")
	}
	if out, err := l.Exec(node, "iptables-save"); err == nil {
		rules := 0
		for _, line := range strings.Split(out, "\n") {
			if strings.HasPrefix(line, "-A SLUICE") {
				rules++
			}
		}
		b.ReportMetric(float64(rules), "sluice-rules")
	}
}

// waitPoliciesProgrammed waits until the agent on node reports want
// policies in its last applied state (sluice_policies_programmed), and
// returns how long that took.
func waitPoliciesProgrammed(b *testing.B, l *labtest.Lab, node string, want int, timeout time.Duration) time.Duration {
	start := time.Now()
	re := regexp.MustCompile(`(?m)^sluice_policies_programmed (\d+)`)
	for time.Since(start) < timeout {
		out, err := l.Exec(node, "sh", "-c", "wget -qO- http://127.0.0.1:9098/metrics 2>/dev/null || curl -s http://127.0.0.1:9098/metrics")
		if m := re.FindStringSubmatch(out); err == nil && m != nil {
			if n, _ := strconv.Atoi(m[1]); n >= want {
				return time.Since(start)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	b.Logf("node-1 had not programmed all %d policies after %s; measuring anyway", want, timeout)
	return time.Since(start)
}
