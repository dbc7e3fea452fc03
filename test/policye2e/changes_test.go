package policye2e

import (
	"context"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/policy"
	"github.com/sluice-net/sluice/test/labtest"
)

// followChanges runs sluicectl changes -f over the lab.
func followChanges(t *testing.T, args ...string) <-chan string {
	t.Helper()
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bins+"/sluicectl", append([]string{"changes", "-f", "--lab-dir", shared.Dir}, args...)...)
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = cmd.Wait() })
	return scanLines(out)
}

// TestChangesShowAJoiningNodeAndACreatedPolicy: sluicectl changes -f on
// node-1 shows the route, neighbour and FDB entries it writes for a node
// that joins, with the Node event as their cause, and the chain it writes
// for a policy created for one of its pods, with the policy as the cause.
func TestChangesShowAJoiningNodeAndACreatedPolicy(t *testing.T) {
	if b := os.Getenv("SLUICE_LAB_BACKEND"); b != "" && b != "vxlan" {
		// The joining node announces a VXLAN VTEP, whose neighbour and FDB
		// entries only a vxlan lab writes.
		t.Skipf("the joining node's entries are vxlan's; this lab's backend is %s", b)
	}
	ctx := context.Background()
	lines := followChanges(t, "--node", "node-1")
	time.Sleep(500 * time.Millisecond)
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "joiner", Annotations: map[string]string{
			"flannel.alpha.coreos.com/backend-type": "vxlan",
			"flannel.alpha.coreos.com/backend-data": `{"VNI":1,"VtepMAC":"0e:00:00:00:cb:01"}`,
			"flannel.alpha.coreos.com/public-ip":    "198.18.0.203",
		}},
		Spec: corev1.NodeSpec{PodCIDR: "10.244.203.0/24", PodCIDRs: []string{"10.244.203.0/24"}},
	}
	if _, err := shared.Client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = shared.Client.CoreV1().Nodes().Delete(context.Background(), "joiner", metav1.DeleteOptions{})
	})
	// The overlay writes the neighbour and FDB entries before the route
	// that needs them: wait for all three, in any order.
	want := map[string]bool{
		"Node joiner added: add route 10.244.203.0/24 via 10.244.203.0 dev vx-sluice.1 onlink":   false,
		"Node joiner added: add neighbour 10.244.203.0 lladdr 0e:00:00:00:cb:01 dev vx-sluice.1": false,
		"Node joiner added: add fdb 0e:00:00:00:cb:01 dst 198.18.0.203 dev vx-sluice.1":          false,
	}
	for seen, deadline := 0, time.After(15*time.Second); seen < len(want); {
		select {
		case l := <-lines:
			for w, done := range want {
				if !done && strings.Contains(l, w) {
					want[w], seen = true, seen+1
				}
			}
		case <-deadline:
			t.Errorf("changes -f did not show all of the joining node's entries: %v", want)
			seen = len(want)
		}
	}
	apply(t, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "journal"}, Spec: networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a")}})
	if nodeOf(t, "x/a") != "node-1" {
		t.Fatalf("x/a is not on node-1")
	}
	chain := policy.PolicyChain("x/journal", false)
	if l, _ := waitLine(lines, 10*time.Second, "policy x/journal changed", "add chain "+chain); l == "" {
		t.Errorf("changes -f did not show the chain %s of the created policy", chain)
	}
}
