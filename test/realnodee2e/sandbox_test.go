package realnodee2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/cni"
	"github.com/sluice-net/sluice/internal/lab"
)

// crictl runs crictl against the node's containerd, in the node's
// namespaces.
func crictl(t *testing.T, node string, args ...string) (string, error) {
	t.Helper()
	bin := filepath.Join(shared.ToolsDir, "crictl-v1.37.0", "crictl")
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("%v (build it with 'make tools')", err)
	}
	place, err := shared.Resolve(node)
	if err != nil {
		t.Fatal(err)
	}
	cmd := place.Command(append([]string{bin, "--runtime-endpoint", "unix://" + lab.ContainerdSocket, "--timeout", "30s"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("crictl %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out), nil
}

// pauseKubelet stops the node's kubelet for the rest of the test, so that
// it neither removes sandboxes it did not make nor restarts them.
func pauseKubelet(t *testing.T, node string) {
	t.Helper()
	b, err := os.ReadFile(shared.Path("logs", node+"-kubelet.pid"))
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	fmt.Sscan(string(b), &pid)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Kill(pid, syscall.SIGCONT) })
}

type sandboxStatus struct {
	Status struct {
		ID      string `json:"id"`
		State   string `json:"state"`
		Network struct {
			IP string `json:"ip"`
		} `json:"network"`
	} `json:"status"`
}

// TestDelOfOldSandboxOnContainerd: two sandboxes of one pod on real
// containerd, made with crictl as the kubelet makes them (same pod name
// and namespace, the next attempt). Stopping the old one makes containerd
// call the CNI DEL for it while the new one runs; the new one must keep its
// network. Then `crictl rmp -f` of the new one releases its IP.
func TestDelOfOldSandboxOnContainerd(t *testing.T) {
	node := shared.Nodes[1].Name
	pauseKubelet(t, node)
	// The agent wires only pods it knows from the API server (CNI 11
	// otherwise), by UID: the pod exists, bound to the paused kubelet's
	// node, and is deleted before the kubelet goes on (cleanups run last
	// in first).
	ctx := ctxT(t, 2*time.Minute)
	if err := shared.EnsureNamespace(ctx, "sandboxes"); err != nil {
		t.Fatal(err)
	}
	pod, err := shared.Client.CoreV1().Pods("sandboxes").Create(ctx, agnhostPod("sandboxes", "twin", node), metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = shared.Client.CoreV1().Pods("sandboxes").Delete(context.Background(), "twin", metav1.DeleteOptions{GracePeriodSeconds: new(int64)})
	})
	dir := t.TempDir()
	runp := func(attempt int) string {
		conf := map[string]any{
			"metadata": map[string]any{"name": "twin", "namespace": "sandboxes", "uid": string(pod.UID), "attempt": attempt},
			"hostname": "twin",
			"linux":    map[string]any{"cgroup_parent": shared.CgroupParent(shared.Nodes[1]) + "/twin"},
		}
		b, _ := json.Marshal(conf)
		p := filepath.Join(dir, fmt.Sprintf("sandbox-%d.json", attempt))
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := crictl(t, node, "runp", p)
		if err != nil {
			t.Fatal(err)
		}
		id := strings.TrimSpace(out)
		t.Cleanup(func() { _, _ = crictl(t, node, "rmp", "-f", id) })
		return id
	}
	inspect := func(id string) sandboxStatus {
		var st sandboxStatus
		out, err := crictl(t, node, "inspectp", id)
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal([]byte(out), &st); err != nil {
			t.Fatalf("crictl inspectp: %v\n%s", err, out)
		}
		return st
	}
	ping := func(ip string) error {
		_, err := shared.Exec(node, "ping", "-c1", "-W2", ip)
		return err
	}
	veth := cni.HostVethName("sandboxes", "twin", "")
	alias := func() string {
		out, err := shared.Exec(node, "ip", "-o", "link", "show", veth)
		if err != nil {
			return ""
		}
		return out
	}

	old := runp(0)
	oldIP := inspect(old).Status.Network.IP
	cur := runp(1)
	curIP := inspect(cur).Status.Network.IP
	if curIP == "" || curIP == oldIP {
		t.Fatalf("sandbox IPs: old %q, current %q", oldIP, curIP)
	}
	if a := alias(); !strings.Contains(a, "alias sluice:"+cur) {
		t.Fatalf("host veth %s does not name the current sandbox %s as owner: %s", veth, cur, a)
	}
	// The control: the current sandbox answers before the old one's DEL.
	if err := ping(curIP); err != nil {
		t.Fatalf("the current sandbox does not answer before the DEL; the test cannot tell: %v", err)
	}

	if _, err := crictl(t, node, "stopp", old); err != nil {
		t.Fatal(err)
	}
	if st := inspect(old).Status.State; st != "SANDBOX_NOTREADY" {
		t.Fatalf("old sandbox state %s after stopp", st)
	}
	if err := ping(curIP); err != nil {
		t.Errorf("the current sandbox lost its network when containerd deleted the old one's: %v", err)
	}
	if a := alias(); !strings.Contains(a, "alias sluice:"+cur) {
		t.Errorf("host veth after the old sandbox's DEL: %q", a)
	}
	released := func(ip string) bool {
		out, _ := shared.Exec(node, "sh", "-c", "ls /var/lib/cni/networks/*/")
		return !strings.Contains(out, ip+"\n")
	}
	if !released(oldIP) {
		t.Errorf("the old sandbox's IP %s is still reserved after its DEL", oldIP)
	}
	if released(curIP) {
		t.Errorf("the current sandbox's IP %s is no longer reserved", curIP)
	}

	if _, err := crictl(t, node, "rmp", "-f", cur); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !released(curIP) && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if !released(curIP) {
		t.Errorf("IP %s still reserved after crictl rmp -f", curIP)
	}
	if a := alias(); a != "" {
		t.Errorf("host veth left after crictl rmp -f: %s", a)
	}
}
