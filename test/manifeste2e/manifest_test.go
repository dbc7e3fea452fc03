// Package manifeste2e installs Sluice the way users do, with
// `kubectl apply -f manifests/sluice.yaml`, on labs started with
// --cni manifest, whose kubelets run the DaemonSet's pods as processes: the
// manifest's ServiceAccount, RBAC, ConfigMap, commands and probes are what
// runs.
package manifeste2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/retry"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// shared is a 3-node lab on which the manifest is applied once.
var shared *labtest.Lab

func TestMain(m *testing.M) {
	labtest.Main(m, lab.Options{Nodes: 3, CNI: lab.CNIManifest}, &shared)
}

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

var (
	installOnce sync.Once
	installErr  error
)

// installed applies the manifest to the shared lab once and waits for the
// agents, so each test can also run alone.
func installed(t *testing.T) {
	t.Helper()
	installOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		if installErr = shared.ApplyManifest(ctx, labtest.Manifest()); installErr == nil {
			installErr = shared.WaitAgentsReady(ctx)
		}
	})
	if installErr != nil {
		t.Fatalf("installing Sluice from its manifest: %v", installErr)
	}
}

// TestApplyDrivesAgentsReady: after `kubectl apply`, every node runs the
// DaemonSet's pod, Ready, with its init container completed, and reports
// its network up; the agent process is exactly the manifest's command and
// authenticates as the manifest's ServiceAccount.
func TestApplyDrivesAgentsReady(t *testing.T) {
	installed(t)
	ctx := ctxT(t)
	ds, err := shared.Client.AppsV1().DaemonSets(lab.AgentNamespace).Get(ctx, lab.AgentDaemonSet, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pods, err := shared.AgentPods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range shared.Nodes {
		p, ok := pods[n.Name]
		if !ok {
			t.Errorf("no agent pod on %s", n.Name)
			continue
		}
		if !labtest.PodReady(p) || p.Status.Phase != corev1.PodRunning {
			t.Errorf("agent pod %s on %s: phase %s, ready %v", p.Name, n.Name, p.Status.Phase, labtest.PodReady(p))
		}
		if len(p.Status.InitContainerStatuses) != 1 || p.Status.InitContainerStatuses[0].State.Terminated == nil || p.Status.InitContainerStatuses[0].State.Terminated.ExitCode != 0 {
			t.Errorf("agent pod on %s: init container status %+v", n.Name, p.Status.InitContainerStatuses)
		}
		if len(p.Status.ContainerStatuses) != 1 || !p.Status.ContainerStatuses[0].Ready || p.Status.ContainerStatuses[0].State.Running == nil {
			t.Errorf("agent pod on %s: container status %+v", n.Name, p.Status.ContainerStatuses)
		}
		node, err := shared.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if !networkUp(node) {
			t.Errorf("node %s conditions: %+v", n.Name, node.Status.Conditions)
		}
		pid, err := shared.AgentPID(n.Name)
		if err != nil || pid == 0 {
			t.Errorf("no sluiced process on %s: %v", n.Name, err)
			continue
		}
		cmdline, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		want := strings.Join(ds.Spec.Template.Spec.Containers[0].Command, "\x00") + "\x00"
		if string(cmdline) != want {
			t.Errorf("sluiced on %s runs %q, the manifest says %q", n.Name, cmdline, want)
		}
		environ, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if !strings.Contains(string(environ), "\x00NODE_NAME="+n.Name+"\x00") {
			t.Errorf("sluiced on %s lacks NODE_NAME from spec.nodeName: %q", n.Name, environ)
		}
		// The agent has no credentials but the token the kubelet projected
		// for the manifest's ServiceAccount.
		if strings.Contains(string(environ), "KUBECONFIG=") || strings.Contains(string(cmdline), "kubeconfig") {
			t.Errorf("sluiced on %s has a kubeconfig: %q %q", n.Name, cmdline, environ)
		}
		token, err := os.ReadFile(fmt.Sprintf("/proc/%d/root/run/secrets/kubernetes.io/serviceaccount/token", pid))
		if err != nil {
			t.Fatalf("the agent's ServiceAccount token: %v", err)
		}
		if user := whoami(t, string(token)); user != "system:serviceaccount:kube-system:sluice" {
			t.Errorf("the agent on %s authenticates as %q", n.Name, user)
		}
	}
}

// whoami asks the API server whose token this is.
func whoami(t *testing.T, token string) string {
	cfg, err := clientcmd.BuildConfigFromFlags("", shared.AdminKubeconfig())
	if err != nil {
		t.Fatal(err)
	}
	cfg = rest.AnonymousClientConfig(cfg)
	cfg.BearerToken = token
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	r, err := cs.AuthenticationV1().SelfSubjectReviews().Create(ctxT(t), &authenticationv1.SelfSubjectReview{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("SelfSubjectReview with the agent's token: %v", err)
	}
	return r.Status.UserInfo.Username
}

func networkUp(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeNetworkUnavailable {
			return c.Status == corev1.ConditionFalse && c.Reason == "SluiceIsUp"
		}
	}
	return false
}

var (
	podsOnce sync.Once
	podsErr  error
)

// podsAcrossNodes starts pod conn/n<i> on node-<i>, answering on port 80.
func podsAcrossNodes(t *testing.T) {
	t.Helper()
	installed(t)
	podsOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		for i, n := range shared.Nodes {
			_, podsErr = shared.CreatePod(ctx, labtest.PodSpec{Namespace: "conn", Name: fmt.Sprintf("n%d", i+1), Node: n.Name, Ports: []corev1.ContainerPort{{ContainerPort: 80}}})
			if podsErr != nil {
				return
			}
		}
	})
	if podsErr != nil {
		t.Fatal(podsErr)
	}
}

// TestPodsAcrossNodesConnect: with only the manifest installed, every pod
// reaches every pod on the other nodes.
func TestPodsAcrossNodesConnect(t *testing.T) {
	podsAcrossNodes(t)
	for i := range shared.Nodes {
		for j := range shared.Nodes {
			if i == j {
				continue
			}
			from, to := fmt.Sprintf("conn/n%d", i+1), fmt.Sprintf("conn/n%d", j+1)
			got, err := shared.ProbeEventually(from, to, 80, false, false, 10*time.Second)
			if err != nil || got != to {
				t.Errorf("%s -> %s: %q, %v", from, to, got, err)
			}
		}
	}
}

// TestDemo runs the steps of `sluicectl lab demo` and checks each matrix
// against its truth table.
func TestDemo(t *testing.T) {
	installed(t)
	labtest.AssertDemo(t, shared)
}

// TestKilledAgentDropsNoConnection: SIGKILL to the agents on both ends of
// an established cross-node connection; the kubelet restarts them and the
// connection carries on.
func TestKilledAgentDropsNoConnection(t *testing.T) {
	podsAcrossNodes(t)
	ctx := ctxT(t)
	echo := shared.EchoConn(t, "conn/n1", "conn/n2", 9100, 5*time.Second)
	if err := echo("before"); err != nil {
		t.Fatal(err)
	}
	before, err := shared.AgentPods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	traffic := startTraffic(echo)
	for _, node := range []string{"node-1", "node-2"} {
		pid, err := shared.AgentPID(node)
		if err != nil || pid == 0 {
			t.Fatalf("no agent on %s: %v", node, err)
		}
		if _, err := labtest.Command("kill", "-KILL", fmt.Sprint(pid)); err != nil {
			t.Fatal(err)
		}
	}
	// The kubelet restarts each agent and it turns Ready again.
	ok := labtest.Eventually(2*time.Minute, func() bool {
		now, err := shared.AgentPods(ctx)
		if err != nil {
			return false
		}
		for _, node := range []string{"node-1", "node-2"} {
			p := now[node]
			if p.UID != before[node].UID || !labtest.PodReady(p) || len(p.Status.ContainerStatuses) != 1 ||
				p.Status.ContainerStatuses[0].RestartCount <= before[node].Status.ContainerStatuses[0].RestartCount {
				return false
			}
		}
		return true
	})
	failures := traffic.stop()
	if !ok {
		now, _ := shared.AgentPods(ctx)
		t.Fatalf("agents not restarted and Ready: %+v", now)
	}
	if len(failures) > 0 {
		t.Errorf("the connection failed while the agents restarted: %v", failures)
	}
	if err := echo("after"); err != nil {
		t.Errorf("echo after the restart: %v", err)
	}
	if got, err := shared.ProbeEventually("conn/n2", "conn/n1", 80, false, false, 10*time.Second); err != nil {
		t.Errorf("a new connection after the restart: %q %v", got, err)
	}
}

// traffic sends an echo every 100 ms until stopped, and records failures.
type traffic struct {
	done     chan struct{}
	finished chan []string
}

func startTraffic(echo func(string) error) *traffic {
	tr := &traffic{done: make(chan struct{}), finished: make(chan []string, 1)}
	go func() {
		var failures []string
		for i := 0; ; i++ {
			select {
			case <-tr.done:
				tr.finished <- failures
				return
			case <-time.After(100 * time.Millisecond):
			}
			if err := echo(fmt.Sprintf("m%d", i)); err != nil {
				failures = append(failures, time.Now().Format("15:04:05.000")+" "+err.Error())
			}
		}
	}()
	return tr
}

func (tr *traffic) stop() []string {
	close(tr.done)
	return <-tr.finished
}

// TestRollingUpgradeKeepsConnections changes the DaemonSet's pod template
// (a new image tag, which the lab maps to the same staged image, and an
// annotation). The pods are replaced node by node, never more than one
// node without a Ready agent (maxUnavailable: 1), while an established
// connection between pods on two nodes keeps working.
func TestRollingUpgradeKeepsConnections(t *testing.T) {
	podsAcrossNodes(t)
	ctx := ctxT(t)
	echo := shared.EchoConn(t, "conn/n2", "conn/n3", 9101, 5*time.Second)
	if err := echo("before"); err != nil {
		t.Fatal(err)
	}
	before, err := shared.AgentPods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	traffic := startTraffic(echo)
	const image = "ghcr.io/sluice-net/sluice:v0.1.1-rolling"
	// The DaemonSet controller writes the object too: retry a conflict.
	var ds *appsv1.DaemonSet
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var err error
		ds, err = shared.Client.AppsV1().DaemonSets(lab.AgentNamespace).Get(ctx, lab.AgentDaemonSet, metav1.GetOptions{})
		if err != nil {
			return err
		}
		tmpl := &ds.Spec.Template
		if tmpl.Annotations == nil {
			tmpl.Annotations = map[string]string{}
		}
		tmpl.Annotations["lab.sluice.dev/rolled"] = "1"
		for i := range tmpl.Spec.InitContainers {
			tmpl.Spec.InitContainers[i].Image = image
		}
		for i := range tmpl.Spec.Containers {
			tmpl.Spec.Containers[i].Image = image
		}
		ds, err = shared.Client.AppsV1().DaemonSets(lab.AgentNamespace).Update(ctx, ds, metav1.UpdateOptions{})
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	maxDown := 0
	var timeline []string // what each sample saw, for the failure message
	done := labtest.Eventually(3*time.Minute, func() bool {
		pods, err := shared.AgentPods(ctx)
		if err != nil {
			return false
		}
		down, replaced := 0, 0
		sample := time.Now().Format("15:04:05.000")
		for _, n := range shared.Nodes {
			p, ok := pods[n.Name]
			if !ok || !labtest.PodReady(p) || p.DeletionTimestamp != nil {
				down++
			}
			sample += fmt.Sprintf(" %s=%s(ready=%v,deleting=%v)", n.Name, p.Name, labtest.PodReady(p), p.DeletionTimestamp != nil)
			if ok && p.UID != before[n.Name].UID && p.Spec.Containers[0].Image == image && labtest.PodReady(p) {
				replaced++
			}
		}
		maxDown = max(maxDown, down)
		if len(timeline) == 0 || timeline[len(timeline)-1][13:] != sample[13:] {
			timeline = append(timeline, sample)
		}
		cur, err := shared.Client.AppsV1().DaemonSets(lab.AgentNamespace).Get(ctx, lab.AgentDaemonSet, metav1.GetOptions{})
		return err == nil && replaced == len(shared.Nodes) && cur.Generation == ds.Generation && lab.DaemonSetDone(cur, len(shared.Nodes))
	})
	failures := traffic.stop()
	if !done {
		pods, _ := shared.AgentPods(ctx)
		t.Fatalf("the rollout did not finish: %+v", pods)
	}
	if maxDown > 1 {
		t.Errorf("%d nodes were without a Ready agent at once; maxUnavailable is 1:\n%s", maxDown, strings.Join(timeline, "\n"))
	}
	if len(failures) > 0 {
		t.Errorf("the connection failed during the rollout: %v\n%s", failures, strings.Join(timeline, "\n"))
	}
	if err := echo("after"); err != nil {
		t.Errorf("echo after the rollout: %v", err)
	}
	if err := shared.WaitAgentsReady(ctx); err != nil {
		t.Error(err)
	}
}
