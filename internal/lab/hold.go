package lab

import (
	"context"
	"os"
	"time"
)

// A hold keeps the lab's supervisor from restarting a component that was
// stopped on purpose: a test stops the control plane to see how the nodes
// ride out an API server outage, and releases it to end the outage.

// HoldPath is the file whose presence holds a component (etcd,
// kube-apiserver, kube-controller-manager, kube-scheduler, kubelet-NODE)
// down. The component's PID is in logs/NAME.pid.
func (s *State) HoldPath(component string) string { return s.Path("logs", component+".hold") }

// ComponentPIDPath is where the supervisor records a component's PID.
func (s *State) ComponentPIDPath(component string) string { return s.Path("logs", component+".pid") }

// ControlPlaneComponents are the control plane's components, in the order
// they start.
func ControlPlaneComponents() []string {
	return []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}
}

// waitReleased returns once no hold is on the component, or ctx ends.
func (s *State) waitReleased(ctx context.Context, component string) {
	for {
		if _, err := os.Stat(s.HoldPath(component)); err != nil {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(100 * time.Millisecond):
		}
	}
}
