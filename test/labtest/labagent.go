package labtest

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// AgentPID is the PID of the sluiced the lab runs on a node (--cni
// sluice). The lab's supervisor records it; nsenter execs sluiced, so the
// PID is the agent's own.
func (l *Lab) AgentPID(node string) (int, error) {
	b, err := os.ReadFile(l.Path("logs", "sluiced-"+node+".pid"))
	if err != nil {
		return 0, fmt.Errorf("reading the agent's PID on %s: %w", node, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("agent PID file of %s: %w", node, err)
	}
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil || strings.TrimSpace(string(comm)) != "sluiced" {
		return 0, fmt.Errorf("PID %d of %s is not a running sluiced", pid, node)
	}
	return pid, nil
}

// StopLabAgent keeps the lab from restarting sluiced on a node and stops
// the running one, by its PID (other labs on the machine run agents too).
func (l *Lab) StopLabAgent(node string) error {
	for _, n := range l.Nodes {
		if n.Name != node {
			continue
		}
		if err := os.WriteFile(n.AgentDisabledPath(), nil, 0o644); err != nil {
			return err
		}
		pid, err := l.AgentPID(node)
		if err != nil {
			return nil // not running
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			return fmt.Errorf("stopping sluiced on %s: %w", node, err)
		}
		for i := 0; i < 250 && alive(pid); i++ {
			time.Sleep(20 * time.Millisecond)
		}
		if alive(pid) {
			return fmt.Errorf("sluiced (PID %d) on %s did not stop", pid, node)
		}
		return nil
	}
	return fmt.Errorf("no node %s", node)
}
