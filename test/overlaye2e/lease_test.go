package overlaye2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/overlay/lease"
	"github.com/sluice-net/sluice/overlay/netconf"
	"github.com/sluice-net/sluice/test/labtest"
)

// TestNoPodCIDRCluster is the cluster flannel cannot run on: no node has a
// podCIDR. Sluice claims subnets itself, and pods reach each other and the
// outside world as usual.
func TestNoPodCIDRCluster(t *testing.T) {
	ctx := ctxT(t)
	l := labtest.StartT(t, lab.Options{Nodes: 3, NoPodCIDR: true, CNI: lab.CNIReference})
	ag := l.StartAgents(t, `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)
	if err := ag.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	seen := map[string]string{}
	for _, n := range l.Nodes {
		node, err := l.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(node.Spec.PodCIDRs) != 1 {
			t.Fatalf("node %s: Sluice's subnet is not visible in spec.podCIDRs: %v", n.Name, node.Spec.PodCIDRs)
		}
		c := node.Spec.PodCIDRs[0]
		if other, dup := seen[c]; dup {
			t.Errorf("%s and %s share %s", other, n.Name, c)
		}
		seen[c] = n.Name
		if _, err := l.Client.CoordinationV1().Leases(lease.Namespace).Get(ctx, lease.ClaimName(netip.MustParsePrefix(c)), metav1.GetOptions{}); err != nil {
			t.Errorf("no claim for %s: %v", c, err)
		}
	}
	if err := ag.WriteConflists(ctx); err != nil {
		t.Fatal(err)
	}
	names := []string{"np/a", "np/b", "np/c"}
	for i, p := range names {
		if _, err := l.CreatePod(ctx, labtest.PodSpec{Namespace: "np", Name: strings.TrimPrefix(p, "np/"), Node: l.Nodes[i].Name,
			Ports: []corev1.ContainerPort{{ContainerPort: 80}}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, from := range names {
		for _, to := range names {
			for _, udp := range []bool{false, true} {
				got, err := l.ProbeEventually(from, to, 80, udp, false, 5*time.Second)
				if err != nil || got != to {
					t.Errorf("%s -> %s udp=%v: %q %v", from, to, udp, got, err)
				}
			}
		}
		got, err := l.ProbeEventually(from, "external", lab.ExternalPort, false, false, 5*time.Second)
		node, _ := l.Node(l.Nodes[indexOf(names, from)].Name)
		if err != nil || got != "external from="+node.IP4 {
			t.Errorf("%s -> external: %q %v; want it masqueraded to %s", from, got, err, node.IP4)
		}
	}

	t.Run("TwentyAgentsAtOnce", func(t *testing.T) { twentyAgentsAtOnce(t, l) })

	// The claim is stable across an agent restart...
	before, _ := l.Client.CoreV1().Nodes().Get(ctx, "node-2", metav1.GetOptions{})
	ag.Kill("node-2")
	if err := ag.Start("node-2"); err != nil {
		t.Fatal(err)
	}
	if err := ag.WaitReady(ctx, "node-2"); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	if log := ag.Log("node-2"); !strings.Contains(log, "lease acquired") || !strings.Contains(log, before.Spec.PodCIDRs[0]) {
		t.Errorf("restarted agent did not keep %s:\n%s", before.Spec.PodCIDRs[0], log)
	}
	// ...and returned when the Node is deleted: the garbage collector
	// removes the claim that the Node owns.
	claim := lease.ClaimName(netip.MustParsePrefix(before.Spec.PodCIDRs[0]))
	ag.Kill("node-3")
	n3, _ := l.Client.CoreV1().Nodes().Get(ctx, "node-3", metav1.GetOptions{})
	claim3 := lease.ClaimName(netip.MustParsePrefix(n3.Spec.PodCIDRs[0]))
	if err := l.Client.CoreV1().Nodes().Delete(ctx, "node-3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		_, err := l.Client.CoordinationV1().Leases(lease.Namespace).Get(ctx, claim3, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	}); err != nil {
		t.Errorf("claim %s of the deleted node-3 was not returned: %v", claim3, err)
	}
	if _, err := l.Client.CoordinationV1().Leases(lease.Namespace).Get(ctx, claim, metav1.GetOptions{}); err != nil {
		t.Errorf("claim %s of a live node disappeared: %v", claim, err)
	}
}

func findByName(m map[netip.Prefix]string, name string) (netip.Prefix, bool) {
	for p, n := range m {
		if n == name {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

func indexOf(list []string, s string) int {
	for i, v := range list {
		if v == s {
			return i
		}
	}
	return -1
}

// twentyAgentsAtOnce claims subnets for 20 nodes at the same moment,
// against the real API server of a cluster without podCIDRs, each with its
// own client, next to the lab's nodes' claims.
func twentyAgentsAtOnce(t *testing.T, shared *labtest.Lab) {
	ctx := ctxT(t)
	nc, err := netconf.Parse([]byte(`{"Network":"10.244.0.0/16"}`))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for i := 0; i < 20; i++ {
		name := fmt.Sprintf("burst-%02d", i)
		names = append(names, name)
		if _, err := shared.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, n := range names {
			_ = shared.Client.CoreV1().Nodes().Delete(context.Background(), n, metav1.DeleteOptions{})
		}
	})
	start := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	got := map[netip.Prefix]string{}
	for _, name := range names {
		cs, err := shared.State.Client()
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			l, err := (&lease.Allocator{Client: cs, Config: nc}).Acquire(ctx, name)
			if err != nil {
				t.Errorf("%s: %v", name, err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if other, dup := got[l.Subnets[0]]; dup {
				t.Errorf("%s and %s both got %s", other, name, l.Subnets[0])
			}
			got[l.Subnets[0]] = name
		}()
	}
	close(start)
	wg.Wait()
	if len(got) != 20 {
		t.Fatalf("%d distinct subnets for 20 nodes", len(got))
	}
	nodes, err := shared.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	all := map[string]string{}
	for _, n := range nodes.Items {
		if other, dup := all[n.Spec.PodCIDR]; dup {
			t.Errorf("%s and %s share %s", other, n.Name, n.Spec.PodCIDR)
		}
		all[n.Spec.PodCIDR] = n.Name
		if p, ok := findByName(got, n.Name); ok && n.Spec.PodCIDR != p.String() {
			t.Errorf("%s: spec.podCIDR %q, want %s", n.Name, n.Spec.PodCIDR, p)
		}
	}
}

// runAgentOnce runs sluiced in the outside world's namespace (so it cannot
// disturb the lab's nodes) and returns its output after it exits or after
// the timeout, killing it then.
func runAgentOnce(t *testing.T, timeout time.Duration, netConf string, args ...string) (string, bool) {
	t.Helper()
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	path := shared.Path(fmt.Sprintf("netconf-%d.json", time.Now().UnixNano()))
	if err := os.WriteFile(path, []byte(netConf), 0o644); err != nil {
		t.Fatal(err)
	}
	place, _ := shared.Resolve("external")
	cmd := place.Command(append([]string{bins + "/sluiced", "--kubeconfig", shared.NodeKubeconfigAdmin(), "--net-conf", path, "--health-addr", "", "--run-dir", t.TempDir()}, args...)...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
		return out.String(), true
	case <-time.After(timeout):
		_ = cmd.Process.Kill()
		<-done
		return out.String(), false
	}
}

func TestBadNetConfIsExplained(t *testing.T) {
	cases := []struct{ conf, want string }{
		{`{"Network": "10.244.0.0/33"}`, `"Network" is "10.244.0.0/33": is not a CIDR`},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "ipip"}}`, `"Backend.Type" is "ipip"`},
		{`{"Network": "10.244.0.0/16", "Backend": {"VNI": 0, "Port": 99999}}`, `"Backend.Port" is 99999`},
		{`{"Network": "10.244.0.0/16"`, "not valid JSON"},
	}
	for _, c := range cases {
		out, exited := runAgentOnce(t, 10*time.Second, c.conf, "--node-name", "node-1", "--iface", "eth0")
		if !exited {
			t.Errorf("%s: agent kept running on a bad config", c.conf)
		}
		if !strings.Contains(out, c.want) {
			t.Errorf("%s: output lacks %q:\n%s", c.conf, c.want, out)
		}
	}
	out, exited := runAgentOnce(t, 10*time.Second, `{"Network": "10.244.0.0/16"}`, "--iface", "eth0")
	if !exited || !strings.Contains(out, "NODE_NAME") {
		t.Errorf("missing node name not explained: %s", out)
	}
}

// TestPodCIDROutsideNetwork: the agent explains the mismatch on the Node
// (condition and Event) and in its log, keeps retrying, and does not exit.
func TestPodCIDROutsideNetwork(t *testing.T) {
	ctx := ctxT(t)
	name := "misfit"
	if _, err := shared.Client.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.NodeSpec{PodCIDR: "10.99.7.0/24", PodCIDRs: []string{"10.99.7.0/24"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = shared.Client.CoreV1().Nodes().Delete(context.Background(), name, metav1.DeleteOptions{}) })
	// While the agent retries, sluicectl status must say why, with the
	// fix the Event gives.
	statusc := make(chan string, 1)
	go func() { statusc <- pollStatus(4*time.Second, "127.0.0.1:19098", "outside Sluice's Network") }()
	out, exited := runAgentOnce(t, 6*time.Second, `{"Network":"10.244.0.0/16"}`, "--node-name", name, "--iface", "eth0", "--health-addr", "127.0.0.1:19098")
	if st := <-statusc; !strings.Contains(st, "overlay: NOT READY, no lease: PodCIDROutsideNetwork: ") || !strings.Contains(st, "--pod-network-cidr") {
		t.Errorf("sluicectl status does not give the reason and fix:\n%s", st)
	}
	if exited {
		t.Errorf("agent exited (it must retry, not crash-loop):\n%s", out)
	}
	for _, want := range []string{"outside Sluice's Network 10.244.0.0/16", "--pod-network-cidr", "podSubnet"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	n, err := shared.Client.CoreV1().Nodes().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeNetworkUnavailable && c.Status == corev1.ConditionTrue && c.Reason == lease.ReasonOutsideNetwork && strings.Contains(c.Message, "10.99.7.0/24") {
			found = true
		}
	}
	if !found {
		t.Errorf("no NetworkUnavailable=True/%s condition: %+v", lease.ReasonOutsideNetwork, n.Status.Conditions)
	}
	events, err := shared.Client.CoreV1().Events("").List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("involvedObject.name", name).String()})
	if err != nil {
		t.Fatal(err)
	}
	found = false
	for _, e := range events.Items {
		if e.Reason == lease.ReasonOutsideNetwork && e.Type == corev1.EventTypeWarning {
			found = true
		}
	}
	if !found {
		t.Errorf("no %s Event on the node; events: %+v", lease.ReasonOutsideNetwork, events.Items)
	}
}

// pollStatus runs sluicectl status against an agent in the outside-world
// namespace until its output holds want, or the time is up; it returns
// the last output.
func pollStatus(timeout time.Duration, addr, want string) string {
	bins, err := labtest.Binaries()
	if err != nil {
		return err.Error()
	}
	place, _ := shared.Resolve("external")
	last := ""
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); time.Sleep(300 * time.Millisecond) {
		b, err := place.Command(bins+"/sluicectl", "status", "--via", "local", "--addr", addr).CombinedOutput()
		if last = fmt.Sprintf("%s(%v)", b, err); strings.Contains(last, want) {
			break
		}
	}
	return last
}
