package calicoe2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/policy"
	"github.com/sluice-net/sluice/test/labtest"
)

const securityTier = `
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}
`

const allowXAFromXB = `
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {namespace: x, name: allow-from-b}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{podSelector: {matchLabels: {pod: b}}}]}]
`

func TestNoPolicyAllOpen(t *testing.T) {
	checkTable(t, "no policy", []int32{80}, tcp, true, map[probeKey]bool{cell("x/b", "x/a", 80, policy.TCP): true})
}

// TestDenyOrderedBeforeAKubernetesAllow: a Calico Deny at order 10 wins
// over the Kubernetes allow at 1000 for port 80; other ports still follow
// the Kubernetes policy, and the end of the default tier drops the rest.
func TestDenyOrderedBeforeAKubernetesAllow(t *testing.T) {
	kubectlApply(t, allowXAFromXB+`---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: deny-80-from-b}
spec:
  order: 10
  selector: pod == 'a'
  ingress:
  - {action: Deny, protocol: TCP, source: {selector: pod == 'b'}, destination: {ports: [80]}}
`)
	checkTable(t, "deny before allow", []int32{80, 81}, tcp, false, map[probeKey]bool{
		cell("x/b", "x/a", 80, policy.TCP): false,
		cell("x/b", "x/a", 81, policy.TCP): true,
		cell("y/b", "x/a", 81, policy.TCP): false,
	})
}

// TestPassIntoTheDefaultTier: the security tier passes web pods on to the
// default tier, where the Kubernetes policy decides, and denies the rest.
func TestPassIntoTheDefaultTier(t *testing.T) {
	kubectlApply(t, securityTier+"---"+allowXAFromXB+`---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: pass-web}
spec:
  tier: security
  selector: all()
  types: [Ingress]
  ingress:
  - {action: Pass, source: {selector: role == 'web'}}
  - {action: Deny}
`)
	checkTable(t, "pass", []int32{80}, tcp, false, map[probeKey]bool{
		cell("x/b", "x/a", 80, policy.TCP): true,  // passed, allowed by the Kubernetes policy
		cell("y/b", "x/a", 80, policy.TCP): false, // passed, dropped at the end of the default tier
		cell("y/b", "y/a", 80, policy.TCP): true,  // passed, nothing in default selects y/a
		cell("x/a", "x/b", 80, policy.TCP): false, // denied in security
	})
}

// TestEndOfTierVersusATierThatSelectsNothing: a tier drops what it does
// not decide for the pods it selects, and leaves the others alone.
func TestEndOfTierVersusATierThatSelectsNothing(t *testing.T) {
	kubectlApply(t, securityTier+`---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: x-from-a-only}
spec:
  tier: security
  namespaceSelector: ns == 'x'
  selector: all()
  types: [Ingress]
  ingress: [{action: Allow, source: {selector: pod == 'a'}}]
`)
	checkTable(t, "end of tier", []int32{80}, tcp, false, map[probeKey]bool{
		cell("y/a", "x/b", 80, policy.TCP): true,
		cell("y/b", "x/b", 80, policy.TCP): false, // selected, no match: the tier's Deny
		cell("x/b", "y/a", 80, policy.TCP): true,  // y/a: the tier selects nothing there
	})
}

// TestDefaultActionPass: a tier whose default action is Pass hands what
// it did not decide to the default tier.
func TestDefaultActionPass(t *testing.T) {
	kubectlApply(t, `
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: passing}
spec: {order: 50, defaultAction: Pass}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-udp}
spec:
  tier: passing
  selector: all()
  types: [Ingress]
  ingress: [{action: Deny, protocol: UDP}]
---`+allowXAFromXB)
	checkTable(t, "defaultAction Pass", []int32{80}, tcpUDP, false, map[probeKey]bool{
		cell("x/b", "x/a", 80, policy.UDP): false,
		cell("x/b", "x/a", 80, policy.TCP): true,
		cell("y/a", "x/a", 80, policy.TCP): false,
		cell("y/a", "y/b", 80, policy.TCP): true,
	})
}

// TestGlobalPolicyWithNamespaceSelector isolates the red namespace from
// the others, leaving the blue one open.
func TestGlobalPolicyWithNamespaceSelector(t *testing.T) {
	kubectlApply(t, `
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: red-isolated}
spec:
  namespaceSelector: team == 'red'
  selector: all()
  types: [Ingress]
  ingress: [{action: Allow, source: {namespaceSelector: team == 'red'}}]
`)
	checkTable(t, "GNP namespaceSelector", []int32{80}, tcp, false, map[probeKey]bool{
		cell("x/b", "x/a", 80, policy.TCP): true,
		cell("y/b", "x/a", 80, policy.TCP): false,
		cell("x/a", "y/b", 80, policy.TCP): true,
	})
}

// TestNetworkSets: egress to the outside world only through a NetworkSet
// of x, or, for y, a GlobalNetworkSet selected with global().
func TestNetworkSets(t *testing.T) {
	kubectlApply(t, fmt.Sprintf(`
apiVersion: projectcalico.org/v3
kind: NetworkSet
metadata: {namespace: x, name: outside, labels: {kind: outside}}
spec: {nets: [%[1]s/32]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: outside-global, labels: {kind: global-outside}}
spec: {nets: [%[1]s/32]}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: to-outside-set}
spec:
  selector: pod == 'a'
  types: [Egress]
  egress: [{action: Allow, destination: {selector: kind == 'outside'}}]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: "y", name: to-global-set}
spec:
  selector: all()
  types: [Egress]
  egress:
  - {action: Allow, destination: {namespaceSelector: global(), selector: kind == 'outside'}}
  - {action: Allow, destination: {namespaceSelector: global(), selector: kind == 'global-outside'}}
`, shared.ExternalIP4))
	checkTable(t, "network sets", []int32{80}, tcp, true, map[probeKey]bool{
		cell("x/a", "external", lab.ExternalPort, policy.TCP): true,
		cell("x/a", "x/b", 80, policy.TCP):                    false,
		cell("y/a", "external", lab.ExternalPort, policy.TCP): true, // the global set, not x's
		cell("x/b", "external", lab.ExternalPort, policy.TCP): true, // not selected
	})
}

// TestNotNetsAndNotPorts: everyone but x/b's address, on every port but
// the 81 range.
func TestNotNetsAndNotPorts(t *testing.T) {
	ctx := context.Background()
	m := readModel(t, ctx)
	xb := m.endpoints["x/b"].IP
	kubectlApply(t, fmt.Sprintf(`
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: nots}
spec:
  selector: pod == 'a'
  ingress:
  - action: Allow
    protocol: TCP
    source: {notNets: [%s/32]}
    destination: {notPorts: ["81:90"]}
`, xb))
	checkTable(t, "notNets/notPorts", []int32{80, 81}, tcp, false, map[probeKey]bool{
		cell("y/b", "x/a", 80, policy.TCP): true,
		cell("y/b", "x/a", 81, policy.TCP): false,
		cell("x/b", "x/a", 80, policy.TCP): false,
	})
}

// TestServiceAccountSelector: pods of service account sa-a accept only
// sa-b's pods, in any namespace.
func TestServiceAccountSelector(t *testing.T) {
	kubectlApply(t, `
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: sa-a-from-sa-b}
spec:
  serviceAccountSelector: sa == 'a'
  types: [Ingress]
  ingress: [{action: Allow, source: {serviceAccounts: {names: [sa-b]}}}]
`)
	checkTable(t, "serviceAccountSelector", []int32{80}, tcp, false, map[probeKey]bool{
		cell("y/b", "x/a", 80, policy.TCP): true,
		cell("y/a", "x/a", 80, policy.TCP): false,
		cell("x/a", "y/b", 80, policy.TCP): true,
	})
}

// TestStagedPolicyChangesNothing: a staged Deny of everything is not
// enforced.
func TestStagedPolicyChangesNothing(t *testing.T) {
	kubectlApply(t, securityTier+`---
apiVersion: projectcalico.org/v3
kind: StagedNetworkPolicy
metadata: {namespace: x, name: would-deny}
spec:
  tier: security
  selector: all()
  ingress: [{action: Deny}]
`)
	checkTable(t, "staged", []int32{80}, tcp, false, map[probeKey]bool{
		cell("y/b", "x/a", 80, policy.TCP): true,
		cell("x/b", "x/a", 80, policy.TCP): true,
	})
}

// TestKubectlServesTheAPI: the short names, the int-or-string ports of
// Calico's examples, and the API server refusing ports the agent could
// not decode.
func TestKubectlServesTheAPI(t *testing.T) {
	ctx := context.Background()
	kubectlApply(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: ports}
spec:
  selector: pod == 'a'
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [80, "8000:8080", "http"]}}]
`)
	// `kubectl get cnp` is ClusterNetworkPolicy (test/cnpe2e), not Calico's.
	for _, args := range [][]string{{"get", "networkpolicies.projectcalico.org", "-A"}, {"get", "caliconetworkpolicy", "-n", "x"}, {"get", "gnp"}, {"get", "tiers"}} {
		out, err := shared.Kubectl(ctx, "", args...)
		if err != nil {
			t.Errorf("kubectl %v: %v: %s", args, err, out)
		}
		if args[1] != "gnp" && args[1] != "tiers" && !strings.Contains(out, "ports") {
			t.Errorf("kubectl %v does not list the policy:\n%s", args, out)
		}
	}
	if out, _ := shared.Kubectl(ctx, "", "get", "tiers", "default", "-o", "jsonpath={.spec.order} {.spec.defaultAction}"); out != "1e+06 Deny" && out != "1000000 Deny" {
		t.Errorf("default tier: %q", out)
	}
	for _, bad := range []string{`"90:80"`, `70000`, `"80:70000"`, `"no spaces"`} {
		doc := fmt.Sprintf("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {namespace: x, name: bad-port}\nspec:\n  ingress: [{action: Allow, protocol: TCP, destination: {ports: [%s]}}]\n", bad)
		if out, err := shared.Kubectl(ctx, doc, "apply", "-f", "-"); err == nil {
			t.Errorf("the API server accepted port %s: %s", bad, out)
			_, _ = shared.Kubectl(ctx, doc, "delete", "-f", "-")
		}
	}
}

// TestREADMEExamplesApply: the README's Calico examples are accepted by
// the API server as written (server-side dry run, so nothing changes).
func TestREADMEExamplesApply(t *testing.T) {
	ctx := context.Background()
	readme, err := os.ReadFile(filepath.Join(labtest.RepoRoot(), "README.md"))
	must(t, err)
	section := string(readme)
	start := strings.Index(section, "## Calico policies")
	if start < 0 {
		t.Fatal("no Calico section in the README")
	}
	section = section[start:]
	if end := strings.Index(section[3:], "\n## "); end > 0 {
		section = section[:end+3]
	}
	var docs []string
	for _, block := range strings.Split(section, "```yaml\n")[1:] {
		doc, _, _ := strings.Cut(block, "```")
		docs = append(docs, doc)
	}
	if len(docs) < 3 {
		t.Fatalf("found %d YAML examples, want the 3", len(docs))
	}
	for _, ns := range []string{"shop", "untrusted"} {
		must(t, shared.EnsureNamespace(ctx, ns))
	}
	for _, doc := range docs {
		if out, err := shared.Kubectl(ctx, doc, "apply", "--dry-run=server", "-f", "-"); err != nil {
			t.Errorf("kubectl apply of the README example: %v: %s\n%s", err, out, doc)
		}
	}
}

// TestCalicoDenyCutsEstablishedConnection: an established connection
// passes conntrack until a Calico Deny stops allowing it; the agent then
// cuts it. A connection the Deny does not match lives on (the control).
func TestCalicoDenyCutsEstablishedConnection(t *testing.T) {
	denied := shared.EchoConn(t, "y/b", "x/a", 9400, time.Second)
	kept := shared.EchoConn(t, "x/b", "x/a", 9401, time.Second)
	if denied("ping") != nil || kept("ping") != nil {
		t.Fatal("control: the connections do not echo before the policy")
	}
	kubectlApply(t, `
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: cut-y}
spec:
  selector: pod == 'a'
  types: [Ingress]
  ingress:
  - {action: Deny, source: {namespaceSelector: ns == 'y'}}
  - {action: Allow}
`)
	deadline := time.Now().Add(10 * time.Second)
	for denied("ping") == nil {
		if time.Now().After(deadline) {
			t.Fatal("the denied connection still works 10 s after the Deny")
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := kept("ping"); err != nil {
		t.Errorf("the connection the Deny does not match was cut: %v", err)
	}
}
