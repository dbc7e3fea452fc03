package lab

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// The DaemonSet manifests/sluice.yaml installs.
const (
	AgentNamespace = "kube-system"
	AgentDaemonSet = "sluice"
)

// Kubectl runs the lab's kubectl as the lab admin and returns its combined
// output.
func (s *State) Kubectl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, KubectlPath(s.ToolsDir), append([]string{"--kubeconfig", s.AdminKubeconfig()}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %w", strings.Join(args, " "), err)
	}
	return string(out), nil
}

// ApplyManifest applies a manifest with `kubectl apply`, as a user installs
// Sluice on a cluster.
func (s *State) ApplyManifest(ctx context.Context, path string) (string, error) {
	return s.Kubectl(ctx, "apply", "-f", path)
}

// WaitAgentsReady waits until Sluice's DaemonSet has an up-to-date, Ready
// pod on every node and every node reports its network up.
func (s *State) WaitAgentsReady(ctx context.Context) error {
	cs, err := s.Client()
	if err != nil {
		return err
	}
	var last string
	for {
		ds, err := cs.AppsV1().DaemonSets(AgentNamespace).Get(ctx, AgentDaemonSet, metav1.GetOptions{})
		if err == nil {
			last = DaemonSetProgress(ds)
			if DaemonSetDone(ds, len(s.Nodes)) {
				nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
				up := 0
				if err == nil {
					for i := range nodes.Items {
						if sluiceReady(&nodes.Items[i]) {
							up++
						}
					}
				}
				if up == len(s.Nodes) {
					return nil
				}
				last += fmt.Sprintf(", %d/%d nodes with NetworkUnavailable=False", up, len(s.Nodes))
			}
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("sluice DaemonSet not ready (%s): %w; see the agents' logs in %s", last, ctx.Err(), s.Path("logs"))
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// DaemonSetDone reports whether the DaemonSet's latest template runs Ready
// on all of nodes.
func DaemonSetDone(ds *appsv1.DaemonSet, nodes int) bool {
	st := ds.Status
	return st.ObservedGeneration >= ds.Generation && int(st.DesiredNumberScheduled) == nodes &&
		st.UpdatedNumberScheduled == st.DesiredNumberScheduled && st.NumberReady == st.DesiredNumberScheduled &&
		st.NumberAvailable == st.DesiredNumberScheduled
}

// DaemonSetProgress is a one-line summary of a DaemonSet's rollout.
func DaemonSetProgress(ds *appsv1.DaemonSet) string {
	st := ds.Status
	return fmt.Sprintf("desired %d, updated %d, ready %d, available %d", st.DesiredNumberScheduled, st.UpdatedNumberScheduled, st.NumberReady, st.NumberAvailable)
}

// WaitNodesReady waits until every node of the lab reports Ready.
func (s *State) WaitNodesReady(ctx context.Context) error {
	cs, err := s.Client()
	if err != nil {
		return err
	}
	for {
		nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		ready := 0
		if err == nil {
			for i := range nodes.Items {
				if nodeReady(&nodes.Items[i]) {
					ready++
				}
			}
		}
		if ready == len(s.Nodes) {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d/%d nodes Ready: %w", ready, len(s.Nodes), ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}
