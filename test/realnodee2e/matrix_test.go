package realnodee2e

import (
	"encoding/json"
	"errors"
	"os/exec"
	"strings"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestPolicyMatrixProbeThroughTheAPIServer: `sluicectl policy matrix
// --probe` with only a kubeconfig computes the table from an agent's model
// and measures every cell by exec of `agnhost connect` in the source pods;
// on real nodes the two agree. The control: on a port nothing serves, the
// model still allows a -> b, the probe cannot connect, and the cell is
// marked (exit 3), so the probe really measures.
func TestPolicyMatrixProbeThroughTheAPIServer(t *testing.T) {
	ctx := ctxT(t, 5*time.Minute)
	createPod(t, ctx, agnhostPod("wsm", "a", shared.Nodes[0].Name))
	b := createPod(t, ctx, agnhostPod("wsm", "b", shared.Nodes[1].Name))
	createPod(t, ctx, agnhostPod("wsm", "c", shared.Nodes[2].Name))
	np := &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: "wsm", Name: "b-from-a"},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{
				PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}}}}}},
		},
	}
	if _, err := shared.Client.NetworkingV1().NetworkPolicies("wsm").Create(ctx, np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// Wait until the policy is programmed on b's node: c -> b is denied.
	denied := false
	for deadline := time.Now().Add(30 * time.Second); !denied && time.Now().Before(deadline); {
		denied = connect(ctx, "wsm", "c", "tcp", b.Status.PodIP, 8080) != nil
	}
	if !denied {
		t.Fatal("c -> b is still allowed 30 s after the policy")
	}
	kc := shared.AdminKubeconfig()
	var out string
	var err error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
		out, err = sluicectl(t, "policy", "matrix", "-n", "wsm", "--port", "8080", "--probe", "--kubeconfig", kc, "-o", "json")
		if err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("policy matrix --probe: %v\n%s", err, out)
	}
	var m struct {
		Cells []struct {
			From, To string
			Allowed  bool
		}
		Observed map[string]bool
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	want := map[string]bool{"wsm/a -> wsm/b": true, "wsm/c -> wsm/b": false, "wsm/b -> wsm/c": true, "wsm/b -> wsm/a": true}
	for _, c := range m.Cells {
		key := c.From + " -> " + c.To
		if w, ok := want[key]; ok && c.Allowed != w {
			t.Errorf("model: %s allowed=%v, want %v", key, c.Allowed, w)
		}
		if got, ok := m.Observed[key]; !ok || got != c.Allowed {
			t.Errorf("probe: %s observed %v (probed %v), model %v", key, got, ok, c.Allowed)
		}
	}
	if len(m.Cells) != 6 {
		t.Errorf("%d cells, want 6 (3 pods, each to the two others)", len(m.Cells))
	}
	out, err = sluicectl(t, "policy", "matrix", "-n", "wsm", "--port", "9999", "--probe", "--kubeconfig", kc)
	var ee *exec.ExitError
	if err == nil || !strings.Contains(out, "!! wsm/a -> wsm/b") {
		t.Errorf("control: on a port nothing serves the probe should differ from the model: %v\n%s", err, out)
	} else if errors.As(err, &ee) && ee.ExitCode() != 3 {
		t.Errorf("control: exit %d, want 3\n%s", ee.ExitCode(), out)
	}
}
