package manifeste2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// networkPolicyRule is the ClusterRole rule that lets the policy loop list
// and watch NetworkPolicies.
const networkPolicyRule = `- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch]
`

// TestMissingPermissionKeepsAgentUnready: with a ClusterRole that lacks
// the NetworkPolicy rule, the agent reports the forbidden error and never
// turns Ready; applying the real manifest then fixes it, which shows the
// rule was the cause.
func TestMissingPermissionKeepsAgentUnready(t *testing.T) {
	l, err := labtest.Start(lab.Options{Nodes: 1, CNI: lab.CNIManifest})
	if err != nil {
		t.Fatal(err)
	}
	// The containers' mounts live in their own mount namespaces: nothing
	// of them may outlive the lab, even when its daemon crashed.
	defer labtest.AssertDownLeavesNothing(t, l, true)
	ctx := ctxT(t)
	orig, err := os.ReadFile(labtest.Manifest())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(orig), networkPolicyRule) {
		t.Fatalf("the manifest no longer has the rule\n%s", networkPolicyRule)
	}
	broken := filepath.Join(t.TempDir(), "sluice-no-netpol.yaml")
	if err := os.WriteFile(broken, []byte(strings.Replace(string(orig), networkPolicyRule, "", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := l.ApplyManifest(ctx, broken); err != nil {
		t.Fatal(err)
	}
	var forbidden string
	if !labtest.Eventually(2*time.Minute, func() bool {
		pods, err := l.AgentPods(ctx)
		if err != nil {
			return false
		}
		p, ok := pods["node-1"]
		if !ok {
			return false
		}
		for _, line := range strings.Split(l.AgentLog(p), "\n") {
			if strings.Contains(line, "forbidden") && strings.Contains(line, "networkpolicies") {
				forbidden = line
				return true
			}
		}
		return false
	}) {
		t.Fatal("the agent never reported that it may not list NetworkPolicies")
	}
	t.Logf("agent: %s", forbidden)
	pods, err := l.AgentPods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if p := pods["node-1"]; labtest.PodReady(p) {
		t.Errorf("the agent is Ready without permission to list NetworkPolicies: %+v", p.Status)
	}
	ds, err := l.Client.AppsV1().DaemonSets(lab.AgentNamespace).Get(ctx, lab.AgentDaemonSet, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if ds.Status.NumberReady != 0 {
		t.Errorf("DaemonSet: %s", lab.DaemonSetProgress(ds))
	}

	if err := l.ApplyManifest(ctx, labtest.Manifest()); err != nil {
		t.Fatal(err)
	}
	// client-go's reflector retries a failed list with a backoff of up to
	// 30 s.
	wctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if err := l.WaitAgentsReady(wctx); err != nil {
		t.Errorf("with the manifest's ClusterRole: %v", err)
	}
}
