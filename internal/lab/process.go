package lab

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"time"
)

// WaitOrStop waits for a started command, which the lab has recorded in
// logs/NAME.pid. When ctx ends first, it sends SIGTERM, and SIGKILL once
// grace is over, and returns ctx's error after the command is gone.
func (s *State) WaitOrStop(ctx context.Context, name string, cmd *exec.Cmd, grace time.Duration) error {
	_ = WriteFileAtomic(s.Path("logs", name+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(grace):
			_ = cmd.Process.Kill()
			<-done
		}
		return ctx.Err()
	}
}

// BindNodeHostPaths binds the node's private copy of each host path over
// it, in the calling process's own mount namespace. The mount point must
// exist on the host; only an empty directory is created there, the content
// lives in the lab directory.
func BindNodeHostPaths(n Node, paths []string) error {
	for _, p := range paths {
		if err := os.MkdirAll(p, 0o755); err != nil {
			return fmt.Errorf("creating mount point %s: %w", p, err)
		}
		src := n.HostDir(p)
		if err := os.MkdirAll(src, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", src, err)
		}
		if err := syscall.Mount(src, p, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
			return fmt.Errorf("binding %s over %s: %w", src, p, err)
		}
	}
	return nil
}
