package realnodee2e

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// leftovers lists what of a lab is still on the machine: network
// namespaces, cgroups, mounts, processes that mention its directory, and
// the directory itself.
func leftovers(s *lab.State, pids []int) []string {
	var left []string
	for _, n := range s.NetNSes {
		if _, err := os.Stat(filepath.Join("/run/netns", n)); err == nil {
			left = append(left, "netns "+n)
		}
	}
	if m, _ := filepath.Glob("/sys/fs/cgroup/*/" + s.CgroupName); len(m) > 0 {
		left = append(left, "cgroups "+strings.Join(m, " "))
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, s.Dir) {
				left = append(left, "mount "+l)
			}
		}
	}
	for _, pid := range pids {
		if b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat"); err == nil && !strings.Contains(string(b), ") Z ") {
			left = append(left, "process "+strconv.Itoa(pid))
		}
	}
	if _, err := os.Stat(s.Dir); err == nil {
		left = append(left, "dir "+s.Dir)
	}
	return left
}

// labProcesses are the processes that mention the lab's directory on their
// command line (the daemon, node processes, containerd, kubelet), run in
// its cgroups (containers, kube-proxy's among them) or in its network
// namespaces (containerd's shims).
func labProcesses(s *lab.State) []int {
	var pids []int
	netns := map[uint64]bool{}
	for _, n := range s.NetNSes {
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join("/run/netns", n), &st) == nil {
			netns[st.Ino] = true
		}
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		cg, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cgroup"))
		var st syscall.Stat_t
		inLabNS := syscall.Stat(filepath.Join("/proc", e.Name(), "ns", "net"), &st) == nil && netns[st.Ino]
		if inLabNS || strings.Contains(string(cmd), s.Dir) || strings.Contains(string(cg), s.CgroupName) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestDownAfterCrashLeavesNothing: a real-node lab with a running pod
// whose daemon, node process, containerd and kubelet are all SIGKILLed (the
// shims and containers live on, orphaned) is removed by lab down without a
// namespace, cgroup, mount, process or file left.
func TestDownAfterCrashLeavesNothing(t *testing.T) {
	l, err := labtest.Start(lab.Options{Nodes: 1, Runtime: lab.RuntimeContainerd, Timeout: 4 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	// Stop removes the test's temporary root (and the lab, if the test
	// failed before its own lab down).
	defer func() { _ = l.Stop() }()
	ctx := ctxT(t, 3*time.Minute)
	// The pod gives the node containers, shims and pod cgroups.
	saved := shared
	shared = l
	createPod(t, ctx, agnhostPod("crash", "orphan", l.Nodes[0].Name))
	shared = saved
	pids := labProcesses(l.State)
	// The control: the lab is there, with its cgroups and containers.
	if left := leftovers(l.State, pids); len(left) < 4 {
		t.Fatalf("before lab down only %v; the test cannot tell", left)
	}
	crash := map[string]int{"daemon": l.DaemonPID()}
	for _, c := range []string{"node-node-1", "node-1-containerd", "node-1-kubelet"} {
		b, err := os.ReadFile(l.Path("logs", c+".pid"))
		if err != nil {
			t.Fatal(err)
		}
		crash[c], _ = strconv.Atoi(strings.TrimSpace(string(b)))
	}
	for name, pid := range crash {
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Errorf("killing %s (%d): %v", name, pid, err)
		}
	}
	time.Sleep(500 * time.Millisecond)
	start := time.Now()
	if err := lab.Down(l.Dir); err != nil {
		t.Errorf("lab down after the crash: %v", err)
	}
	t.Logf("lab down after a crash took %s", time.Since(start).Round(time.Millisecond))
	if left := leftovers(l.State, pids); len(left) > 0 {
		t.Errorf("left after lab down:\n%s", strings.Join(left, "\n"))
	}
	if p := labProcesses(l.State); len(p) > 0 {
		t.Errorf("processes of the lab still running: %v", p)
	}
}
