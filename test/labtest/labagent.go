package labtest

import (
	"fmt"
	"os"
	"syscall"
	"time"
)

// StopLabAgent keeps the lab's kubelet from restarting sluiced on a node
// and stops the running one, by its PID (other labs on the machine run
// agents too).
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
			return err
		}
		if pid == 0 {
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

// KillAgent kills the sluiced of one node with SIGKILL, leaving its
// restart to the lab's kubelet (unless AgentDisabledPath holds it back).
// Unlike `pkill -x sluiced` on a node, it spares other labs' agents.
func (l *Lab) KillAgent(node string) error {
	pid, err := l.AgentPID(node)
	if err != nil {
		return err
	}
	if pid == 0 {
		return fmt.Errorf("no sluiced runs on %s", node)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		return fmt.Errorf("killing sluiced on %s: %w", node, err)
	}
	return nil
}
