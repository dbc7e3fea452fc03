package realnodee2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/sluice-net/sluice/internal/lab"
)

// keepAlive is one HTTP/1.1 connection from a pod to agnhost netexec in
// another, kept open across requests.
type keepAlive struct {
	conn net.Conn
	r    *bufio.Reader
}

func (k *keepAlive) hostname() (string, error) {
	_ = k.conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprint(k.conn, "GET /hostname HTTP/1.1\r\nHost: x\r\n\r\n"); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(k.r, nil)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// agentPod returns the name of the sluice pod on a node and its sluiced
// container's restart count.
func agentPod(ctx context.Context, t *testing.T, node string) (string, int32, string) {
	t.Helper()
	pods, err := shared.Client.CoreV1().Pods(lab.AgentNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=sluice", FieldSelector: "spec.nodeName=" + node})
	if err != nil || len(pods.Items) != 1 {
		t.Fatalf("sluice pod on %s: %v (%d pods)", node, err, len(pods.Items))
	}
	p := pods.Items[0]
	for _, st := range p.Status.ContainerStatuses {
		if st.Name == "sluiced" {
			return p.Name, st.RestartCount, strings.TrimPrefix(st.ContainerID, "containerd://")
		}
	}
	t.Fatalf("pod %s has no sluiced status", p.Name)
	return "", 0, ""
}

// TestAgentKillAndRollingUpdateKeepConnections: an established TCP
// connection between pods on two nodes survives SIGKILL of both nodes'
// sluiced containers (containerd restarts them) and a rolling update of
// the DaemonSet.
func TestAgentKillAndRollingUpdateKeepConnections(t *testing.T) {
	ctx := ctxT(t, 6*time.Minute)
	a, b := shared.Nodes[0], shared.Nodes[1]
	createPod(t, ctx, agnhostPod("survive", "client", a.Name))
	server := createPod(t, ctx, agnhostPod("survive", "server", b.Name))
	place, err := shared.Resolve("survive/client")
	if err != nil {
		t.Fatal(err)
	}
	// Running comes before netexec listens.
	var conn net.Conn
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		conn, err = place.Dial("tcp", net.JoinHostPort(server.Status.PodIP, "8080"), 3*time.Second)
		return err == nil, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	k := &keepAlive{conn: conn, r: bufio.NewReader(conn)}
	if got, err := k.hostname(); err != nil || got != "server" {
		t.Fatalf("first request: %q, %v", got, err)
	}

	for _, n := range []lab.Node{a, b} {
		pod, restarts, id := agentPod(ctx, t, n.Name)
		pidb, err := os.ReadFile(filepath.Join(n.HostDir("/run"), "containerd", "io.containerd.runtime.v2.task", "k8s.io", id, "init.pid"))
		if err != nil {
			t.Fatal(err)
		}
		pid, _ := strconv.Atoi(strings.TrimSpace(string(pidb)))
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatalf("killing sluiced (%d) on %s: %v", pid, n.Name, err)
		}
		err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
			p, err := shared.Client.CoreV1().Pods(lab.AgentNamespace).Get(ctx, pod, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			for _, st := range p.Status.ContainerStatuses {
				if st.Name == "sluiced" && st.RestartCount > restarts && st.Ready {
					return true, nil
				}
			}
			return false, nil
		})
		if err != nil {
			t.Fatalf("sluiced on %s was not restarted and Ready: %v", n.Name, err)
		}
	}
	if got, err := k.hostname(); err != nil || got != "server" {
		t.Errorf("request on the established connection after the agents were killed: %q, %v", got, err)
	}

	if _, err := shared.Kubectl(ctx, "", "-n", lab.AgentNamespace, "rollout", "restart", "ds/"+lab.AgentDaemonSet); err != nil {
		t.Fatal(err)
	}
	if _, err := shared.Kubectl(ctx, "", "-n", lab.AgentNamespace, "rollout", "status", "ds/"+lab.AgentDaemonSet, "--timeout=4m"); err != nil {
		t.Fatal(err)
	}
	if err := shared.WaitAgentsReady(ctx); err != nil {
		t.Fatal(err)
	}
	if got, err := k.hostname(); err != nil || got != "server" {
		t.Errorf("request on the established connection after a rolling update: %q, %v", got, err)
	}
}
