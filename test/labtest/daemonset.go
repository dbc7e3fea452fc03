package labtest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
)

// Manifest is the repository's install manifest.
func Manifest() string { return filepath.Join(RepoRoot(), "manifests", "sluice.yaml") }

// ApplyManifest runs `kubectl apply -f path` on a lab started with
// lab.CNIManifest, whose kubelets then run the DaemonSet's pods.
func (l *Lab) ApplyManifest(ctx context.Context, path string) error {
	if out, err := l.State.ApplyManifest(ctx, path); err != nil {
		return fmt.Errorf("%w\n%s", err, out)
	}
	return nil
}

// AgentPods returns the pods of Sluice's DaemonSet by node.
func (l *Lab) AgentPods(ctx context.Context) (map[string]corev1.Pod, error) {
	pods, err := l.Client.CoreV1().Pods(lab.AgentNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=sluice"})
	if err != nil {
		return nil, err
	}
	byNode := map[string]corev1.Pod{}
	for _, p := range pods.Items {
		byNode[p.Spec.NodeName] = p
	}
	return byNode, nil
}

// AgentPID finds the sluiced process in a node's network namespace, 0 if
// there is none. Unlike `pkill -x sluiced`, it never touches the agents of
// another lab on the same machine.
func (l *Lab) AgentPID(node string) (int, error) {
	n, ok := l.Node(node)
	if !ok {
		return 0, fmt.Errorf("no node %s", node)
	}
	var want syscall.Stat_t
	if err := syscall.Stat(filepath.Join("/run/netns", n.NetNS), &want); err != nil {
		return 0, fmt.Errorf("node %s namespace: %w", node, err)
	}
	procs, _ := os.ReadDir("/proc")
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		comm, err := os.ReadFile(filepath.Join("/proc", p.Name(), "comm"))
		if err != nil || strings.TrimSpace(string(comm)) != "sluiced" {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join("/proc", p.Name(), "ns", "net"), &st) == nil && st.Ino == want.Ino && alive(pid) {
			return pid, nil
		}
	}
	return 0, nil
}

// PodReady reports the pod's Ready condition.
func PodReady(p corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// AgentLog returns what the sluiced container of an agent pod wrote,
// across its restarts.
func (l *Lab) AgentLog(pod corev1.Pod) string {
	b, _ := os.ReadFile(l.Path("logs", fmt.Sprintf("%s_%s_%s_sluiced.log", pod.Spec.NodeName, pod.Namespace, pod.Name)))
	return string(b)
}

// AgentLogPath is the log of the sluiced container of the agent pod
// currently on a node, or "" if it has none.
func (l *Lab) AgentLogPath(node string) string {
	matches, _ := filepath.Glob(l.Path("logs", fmt.Sprintf("%s_%s_*_sluiced.log", node, lab.AgentNamespace)))
	var newest string
	var newestTime int64
	for _, m := range matches {
		if st, err := os.Stat(m); err == nil && st.ModTime().UnixNano() > newestTime {
			newest, newestTime = m, st.ModTime().UnixNano()
		}
	}
	return newest
}
