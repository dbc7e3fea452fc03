package policye2e

import (
	"context"
	"encoding/json"
	"os/exec"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab/demo"
	"github.com/sluice-net/sluice/policy"
	"github.com/sluice-net/sluice/test/labtest"
)

// TestPolicyMatrixProbeOnTheDemo runs the demo's steps; after each, the
// matrix sluicectl policy matrix computes from the model is the step's
// truth table, and --probe measures the same (no cell marked).
func TestPolicyMatrixProbeOnTheDemo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	d, err := demo.New(shared.State)
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Setup(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = shared.Client.CoreV1().Namespaces().Delete(context.Background(), demo.Namespace, metav1.DeleteOptions{})
	})
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range demo.Steps() {
		if err := st.Apply(ctx, shared.Client); err != nil {
			t.Fatal(err)
		}
		if got, err := d.WaitFor(ctx, st.Want); err != nil {
			t.Fatalf("step %q: %v\n%s", st.Title, err, d.Format(got, st.Want))
		}
		var out []byte
		var m struct {
			policy.Matrix
			Observed map[string]bool `json:"observed"`
		}
		// The agent asked may sync the step a moment after the probe sees it.
		for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(time.Second) {
			out, err = exec.Command(bins+"/sluicectl", "policy", "matrix", "-n", demo.Namespace, "--port", "8080", "--probe", "-o", "json", "--lab-dir", shared.Dir).CombinedOutput()
			if err == nil || time.Now().After(deadline) {
				break
			}
		}
		if err != nil {
			t.Fatalf("step %q: matrix --probe differs or failed: %v\n%s", st.Title, err, out)
		}
		if err := json.Unmarshal(out, &m); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if len(m.Cells) != len(st.Want) {
			t.Fatalf("step %q: %d cells, want %d:\n%s", st.Title, len(m.Cells), len(st.Want), out)
		}
		for _, c := range m.Cells {
			pair := demo.Pair{From: strings.TrimPrefix(c.From, demo.Namespace+"/"), To: strings.TrimPrefix(c.To, demo.Namespace+"/")}
			if c.Allowed != st.Want[pair] || m.Observed[c.From+" -> "+c.To] != c.Allowed {
				t.Errorf("step %q: %s -> %s: model %v (%s), probe %v, the demo's table %v", st.Title, c.From, c.To, c.Allowed, c.Why, m.Observed[c.From+" -> "+c.To], st.Want[pair])
			}
		}
	}
}
