package labtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/sluice-net/sluice/internal/lab"
)

// Agents runs sluiced on lab nodes as plain processes, for tests that
// start agents with their own net-conf.json on labs without Sluice
// (lab.CNIReference).
type Agents struct {
	lab     *Lab
	netConf string
	args    []string
	mu      sync.Mutex
	procs   map[string]*exec.Cmd
	runs    map[string]int
}

// StartAgents writes net-conf.json and starts sluiced on every node. They
// are killed when the test ends.
func (l *Lab) StartAgents(t testing.TB, netConf string, args ...string) *Agents {
	t.Helper()
	a, err := l.StartAgentsNoT(netConf, args...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.StopAll)
	return a
}

// StartAgentsNoT is StartAgents for TestMain; the caller stops them.
func (l *Lab) StartAgentsNoT(netConf string, args ...string) (*Agents, error) {
	var nodes []string
	for _, n := range l.Nodes {
		nodes = append(nodes, n.Name)
	}
	return l.startAgents(netConf, nodes, args)
}

// StartAgentsOn starts sluiced on some nodes only; the caller stops them.
func (l *Lab) StartAgentsOn(netConf string, nodes ...string) (*Agents, error) {
	return l.startAgents(netConf, nodes, nil)
}

func (l *Lab) startAgents(netConf string, nodes, args []string) (*Agents, error) {
	path := l.Path("net-conf.json")
	if err := os.WriteFile(path, []byte(netConf), 0o644); err != nil {
		return nil, err
	}
	a := &Agents{lab: l, netConf: path, args: args, procs: map[string]*exec.Cmd{}, runs: map[string]int{}}
	for _, n := range nodes {
		if err := a.Start(n); err != nil {
			a.StopAll()
			return nil, err
		}
	}
	return a, nil
}

// LogPath is the log of the agent's current run on a node.
func (a *Agents) LogPath(node string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lab.Path("logs", fmt.Sprintf("sluiced-%s-%d.log", node, a.runs[node]))
}

// Start starts the agent on a node.
func (a *Agents) Start(node string) error {
	bins, err := Binaries()
	if err != nil {
		return err
	}
	place, err := a.lab.Resolve(node)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.runs[node]++
	a.mu.Unlock()
	logf, err := os.Create(a.LogPath(node))
	if err != nil {
		return err
	}
	defer logf.Close()
	args := append([]string{filepath.Join(bins, "sluiced"),
		"--kubeconfig", a.lab.NodeKubeconfigAdmin(), "--node-name", node, "--net-conf", a.netConf,
		"--health-addr", "127.0.0.1:9098"}, a.args...)
	cmd := place.Command(args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		return err
	}
	go cmd.Wait()
	a.mu.Lock()
	a.procs[node] = cmd
	a.mu.Unlock()
	return nil
}

// Kill sends SIGKILL to the agent on a node, as a crash would.
func (a *Agents) Kill(node string) {
	a.mu.Lock()
	cmd := a.procs[node]
	delete(a.procs, node)
	a.mu.Unlock()
	if cmd != nil && cmd.Process != nil {
		_ = cmd.Process.Signal(syscall.SIGKILL)
		waitGone(cmd.Process.Pid)
	}
}

func waitGone(pid int) {
	for i := 0; i < 100 && alive(pid); i++ {
		time.Sleep(20 * time.Millisecond)
	}
}

// StopAll kills every agent.
func (a *Agents) StopAll() {
	if a.lab == nil {
		return
	}
	for _, n := range a.lab.Nodes {
		a.Kill(n.Name)
	}
}

// Log returns the agent's current log on a node.
func (a *Agents) Log(node string) string {
	b, _ := os.ReadFile(a.LogPath(node))
	return string(b)
}

// WaitReady waits until every node has NetworkUnavailable=False from
// Sluice.
func (a *Agents) WaitReady(ctx context.Context, nodes ...string) error {
	if len(nodes) == 0 {
		for _, n := range a.lab.Nodes {
			nodes = append(nodes, n.Name)
		}
	}
	return wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		for _, name := range nodes {
			n, err := a.lab.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			ready := false
			for _, c := range n.Status.Conditions {
				if c.Type == corev1.NodeNetworkUnavailable && c.Status == corev1.ConditionFalse && c.Reason == "SluiceIsUp" {
					ready = true
				}
			}
			if !ready {
				return false, nil
			}
		}
		return true, nil
	})
}

// WriteConflists gives every node the reference ptp chain for the subnets
// in its spec.podCIDRs, with the MTU from the agent's subnet.env, so pods
// can run over Sluice's overlay before Sluice's own CNI plugin exists.
func (a *Agents) WriteConflists(ctx context.Context) error {
	for _, n := range a.lab.Nodes {
		node, err := a.lab.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		env, err := a.lab.Exec(n.Name, "cat", "/run/sluice/subnet.env")
		if err != nil {
			return err
		}
		mtu := 1500
		for _, l := range strings.Split(env, "\n") {
			if v, ok := strings.CutPrefix(l, "SLUICE_MTU="); ok {
				fmt.Sscan(v, &mtu)
			}
		}
		if err := lab.WriteReferenceConflist(n, node.Spec.PodCIDRs, mtu); err != nil {
			return err
		}
	}
	return nil
}

// AgentsWithPods is a setup for Main: sluiced on every node with netConf,
// the node conflists written once the agents are ready, and one pod per
// node in the nodes' order (pods are namespace/name, answering on 80 and
// 81), with args added to sluiced's flags. *agents is set for the tests;
// the cleanup stops them.
func AgentsWithPods(netConf string, pods []string, agents **Agents, args ...string) func(*Lab) (func(), error) {
	return func(l *Lab) (func(), error) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		a, err := l.StartAgentsNoT(netConf, args...)
		if err != nil {
			return nil, err
		}
		*agents = a
		if err := a.WaitReady(ctx); err != nil {
			return a.StopAll, fmt.Errorf("agents not ready: %w", err)
		}
		if err := a.WriteConflists(ctx); err != nil {
			return a.StopAll, err
		}
		for i, p := range pods {
			nsName, name, _ := strings.Cut(p, "/")
			if _, err := l.CreatePod(ctx, PodSpec{Namespace: nsName, Name: name, Node: l.Nodes[i].Name,
				Ports: []corev1.ContainerPort{{ContainerPort: 80}, {ContainerPort: 81}}}); err != nil {
				return a.StopAll, err
			}
		}
		return a.StopAll, nil
	}
}
