package labtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// Command runs a command and returns its combined output.
func Command(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// AssertDownLeavesNothing removes the lab and checks that no namespace,
// process, mount or file of it remains. With crash, it first kills the lab
// daemon with SIGKILL, so Down must clean up after orphans.
func AssertDownLeavesNothing(t *testing.T, l *Lab, crash bool) {
	t.Helper()
	var pids []int
	if p := l.DaemonPID(); p > 0 {
		pids = append(pids, p)
	}
	files, _ := filepath.Glob(l.Path("logs", "*.pid"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		if p, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			pids = append(pids, p)
		}
	}
	if len(pids) < 2 {
		t.Fatalf("found only pids %v of the lab's processes", pids)
	}
	if crash {
		_ = syscall.Kill(l.DaemonPID(), syscall.SIGKILL)
	}
	if err := l.Stop(); err != nil {
		t.Errorf("lab down: %v", err)
	}
	for _, n := range l.NetNSes {
		if _, err := os.Stat("/run/netns/" + n); err == nil {
			t.Errorf("namespace %s remains", n)
		}
	}
	out, _ := Command("ip", "netns", "list")
	if strings.Contains(out, "sl"+l.ID+"-") {
		t.Errorf("ip netns list still shows the lab's namespaces:\n%s", out)
	}
	for _, p := range pids {
		if alive(p) {
			t.Errorf("process %d of the lab is still running", p)
		}
	}
	if _, err := os.Stat(l.Dir); !os.IsNotExist(err) {
		t.Errorf("lab directory %s remains (%v)", l.Dir, err)
	}
	mountinfos, _ := filepath.Glob("/proc/[0-9]*/mountinfo")
	for _, f := range mountinfos {
		b, _ := os.ReadFile(f)
		if strings.Contains(string(b), l.Dir) {
			t.Errorf("%s still mounts something from %s", f, l.Dir)
		}
	}
}

func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	st := string(b)
	i := strings.LastIndexByte(st, ')')
	return i < 0 || i+2 >= len(st) || st[i+2] != 'Z'
}
