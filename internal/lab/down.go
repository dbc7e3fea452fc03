package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// Down removes every process, namespace, mount and file of the lab in dir.
// It works from the recorded state alone, so it also cleans up after the
// lab's processes crashed or a previous Down was interrupted.
func Down(dir string) error {
	s, err := Load(dir)
	if err != nil {
		return err
	}
	var errs []error
	// Ask the daemon to stop its children, then make sure of it.
	if pid := s.DaemonPID(); processAlive(pid) {
		_ = syscall.Kill(pid, syscall.SIGTERM)
		waitGone(func() bool { return processAlive(pid) }, 10*time.Second)
		// The daemon leads its own session; anything left in it goes too.
		_ = syscall.Kill(-pid, syscall.SIGKILL)
	}
	// Processes can also be inside a lab namespace without being the
	// daemon's children (a crashed daemon's orphans, `lab exec` shells).
	// On real nodes, containers (and their shims, reparented to init) are
	// found through the lab's cgroups too; a pod's namespace is pinned in
	// the node's mount namespace and may be unreachable once the node's
	// processes are gone.
	left := func() []int { return append(s.processesInLab(), s.cgroupProcs()...) }
	for round := 0; round < 3 && len(left()) > 0; round++ {
		for _, pid := range left() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		waitGone(func() bool { return len(left()) > 0 }, 5*time.Second)
	}
	if l := left(); len(l) > 0 {
		errs = append(errs, fmt.Errorf("processes still in lab namespaces or cgroups: %v", l))
	}
	for _, n := range s.NetNSes {
		if err := deleteNetNS(n); err != nil {
			errs = append(errs, err)
		}
	}
	if err := s.removeCgroups(); err != nil {
		errs = append(errs, err)
	}
	if err := os.RemoveAll(s.Dir); err != nil {
		errs = append(errs, fmt.Errorf("removing lab dir: %w", err))
	}
	return errors.Join(errs...)
}

func waitGone(alive func() bool, timeout time.Duration) {
	deadline := time.Now().Add(timeout)
	for alive() && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
}

// processesInLab lists live processes whose network namespace is one of
// the lab's, or whose mount namespace belongs to a lab node (pods' network
// namespaces are only reachable through those).
func (s *State) processesInLab() []int {
	inodes := map[uint64]bool{}
	for _, n := range s.NetNSes {
		var st syscall.Stat_t
		if err := syscall.Stat(netnsPath(n), &st); err == nil {
			inodes[st.Ino] = true
		}
	}
	for _, n := range s.Nodes {
		// Pod namespaces are pinned inside the node's mount namespace and
		// are reachable through the kubelet's /proc entry.
		if pid := n.KubeletPID(); processAlive(pid) {
			entries, _ := os.ReadDir(fmt.Sprintf("/proc/%d/root/run/netns", pid))
			for _, e := range entries {
				var st syscall.Stat_t
				if err := syscall.Stat(fmt.Sprintf("/proc/%d/root/run/netns/%s", pid, e.Name()), &st); err == nil {
					inodes[st.Ino] = true
				}
			}
		}
	}
	self := os.Getpid()
	var pids []int
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid == self {
			continue
		}
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join("/proc", p.Name(), "ns", "net"), &st); err != nil {
			continue
		}
		if inodes[st.Ino] && processAlive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// KubeletPID is the pid of the node's lab kubelet, whose mount namespace is
// the node's.
func (n Node) KubeletPID() int {
	b, err := os.ReadFile(filepath.Join(n.Dir, "kubelet.pid"))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(string(b))
	return pid
}
