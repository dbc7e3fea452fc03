package labtest

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sluice-net/sluice/internal/lab"
)

// StopControlPlane stops the lab's etcd, API server, controller manager
// and scheduler, and holds them down (lab.State.HoldPath) until
// StartControlPlane: an API server outage, with the nodes, their kubelets
// and agents left running.
func (l *Lab) StopControlPlane() error {
	comps := slices.Clone(lab.ControlPlaneComponents())
	slices.Reverse(comps) // clients first, etcd last
	for _, c := range comps {
		if err := os.WriteFile(l.HoldPath(c), nil, 0o644); err != nil {
			return err
		}
		b, err := os.ReadFile(l.ComponentPIDPath(c))
		if err != nil {
			return fmt.Errorf("%s: %w", c, err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil {
			return fmt.Errorf("%s PID %q: %w", c, b, err)
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && err != syscall.ESRCH {
			return fmt.Errorf("stopping %s: %w", c, err)
		}
		waitGone(pid)
		if alive(pid) {
			return fmt.Errorf("%s (PID %d) did not stop", c, pid)
		}
	}
	return nil
}

// StartControlPlane releases the holds and returns once the API server
// answers /readyz.
func (l *Lab) StartControlPlane(ctx context.Context) error {
	for _, c := range lab.ControlPlaneComponents() {
		if err := os.Remove(l.HoldPath(c)); err != nil && !os.IsNotExist(err) {
			return err
		}
	}
	for {
		err := l.Client.Discovery().RESTClient().Get().AbsPath("/readyz").Do(ctx).Error()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("API server not ready after the outage: %w (last: %v)", ctx.Err(), err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// FastClient is a client of the lab's API server without client-go's
// default rate limit (5 QPS), for benchmarks that create thousands of
// objects.
func (l *Lab) FastClient() (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", l.AdminKubeconfig())
	if err != nil {
		return nil, err
	}
	cfg.QPS, cfg.Burst = 2000, 4000
	return kubernetes.NewForConfig(cfg)
}
