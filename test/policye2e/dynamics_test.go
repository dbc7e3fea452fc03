package policye2e

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/sluice-net/sluice/policy"
	"github.com/sluice-net/sluice/test/labtest"
)

// TestNewDenyCutsEstablishedConnection: conntrack would pass an
// established flow; the agent deletes its entry when a policy stops
// allowing it.
func TestNewDenyCutsEstablishedConnection(t *testing.T) {
	conn := shared.EchoConn(t, "y/b", "z/a", 9400, time.Second)
	echo := func() error { return conn("ping") }
	if err := echo(); err != nil {
		t.Fatal(err)
	}
	apply(t, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "z", Name: "deny-a"}, Spec: networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a")}})
	deadline := time.Now().Add(10 * time.Second)
	for echo() == nil {
		if time.Now().After(deadline) {
			for _, n := range shared.Nodes {
				b, _ := os.ReadFile(shared.AgentLogPath(n.Name))
				t.Logf("%s agent log:\n%s", n.Name, lastLines(string(b), 15))
			}
			t.Fatal("the established connection still works 10 s after a deny")
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestPodIsIsolatedFromItsFirstPacket: the CNI ADD returns only once the
// pod's chains are in place, so the very first probe after it runs is
// already denied.
func TestPodIsIsolatedFromItsFirstPacket(t *testing.T) {
	ctx := context.Background()
	if _, err := shared.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "late", Labels: map[string]string{"ns": "late"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	apply(t, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "late", Name: "deny"}, Spec: networkingv1.NetworkPolicySpec{
		PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress}}})
	for i := 0; i < 3; i++ {
		name := fmt.Sprintf("p%d", i)
		if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "late", Name: name, Node: shared.Nodes[i].Name, Ports: []corev1.ContainerPort{{ContainerPort: 80}}}); err != nil {
			t.Fatal(err)
		}
		if got, err := shared.Probe("x/a", "late/"+name, 80, false, false); err == nil {
			t.Errorf("x/a reached late/%s (%q) right after it started", name, got)
		}
		if got, err := shared.Probe("late/"+name, "x/a", 80, false, false); err == nil {
			t.Errorf("late/%s reached x/a (%q) right after it started", name, got)
		}
	}
}

// TestRelabelling: policies follow pod and namespace labels.
func TestRelabelling(t *testing.T) {
	ctx := context.Background()
	apply(t, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "only-friends"}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: *sel("pod", "b"),
		Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{
			{NamespaceSelector: sel("friend", "yes")}, {PodSelector: sel("friend", "yes")},
		}}},
	}})
	checkTable(t, "before relabelling", []int32{80}, []policy.Protocol{policy.TCP})
	patch := func(kind, ns, name, label string) {
		p := []byte(fmt.Sprintf(`{"metadata":{"labels":{"friend":%s}}}`, label))
		var err error
		if kind == "ns" {
			_, err = shared.Client.CoreV1().Namespaces().Patch(ctx, name, types.MergePatchType, p, metav1.PatchOptions{})
		} else {
			_, err = shared.Client.CoreV1().Pods(ns).Patch(ctx, name, types.MergePatchType, p, metav1.PatchOptions{})
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	patch("ns", "", "z", `"yes"`)
	patch("pod", "x", "c", `"yes"`)
	defer patch("ns", "", "z", "null")
	defer patch("pod", "x", "c", "null")
	checkTable(t, "after relabelling namespace z and pod x/c", []int32{80}, []policy.Protocol{policy.TCP})
	if _, err := shared.ProbeEventually("z/c", "x/b", 80, false, false, 5*time.Second); err != nil {
		t.Errorf("z/c cannot reach x/b after z was labelled a friend: %v", err)
	}
}

// TestPolicyDriftIsRepaired breaks the policy dataplane behind the agent's
// back (a flushed policy chain, a flushed peer set, a flushed dispatch
// chain) and checks the truth table is right again within seconds.
func TestPolicyDriftIsRepaired(t *testing.T) {
	apply(t,
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "y", Name: "deny"}},
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "y", Name: "from-x"}, Spec: networkingv1.NetworkPolicySpec{
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "x")}}}},
		}})
	checkTable(t, "before breaking", []int32{80}, []policy.Protocol{policy.TCP})
	for _, n := range shared.Nodes {
		out, err := shared.Exec(n.Name, "iptables-save", "-t", "filter")
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(l, ":SLUICE-PI-") || strings.HasPrefix(l, ":SLUICE-TO-POD") {
				chain := strings.Fields(l[1:])[0]
				if _, err := shared.Exec(n.Name, "iptables", "-F", chain); err != nil {
					t.Fatal(err)
				}
			}
		}
		sets, _ := shared.Exec(n.Name, "ipset", "list", "-n")
		for _, s := range strings.Fields(sets) {
			if strings.HasPrefix(s, "SLUICE-S4-") {
				if _, err := shared.Exec(n.Name, "ipset", "flush", s); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	checkTable(t, "after breaking chains and sets", []int32{80}, []policy.Protocol{policy.TCP})
}

// TestAgentRestartRewritesNothing: rewriting a chain resets its packet
// counters, so counters that survive a restart of the agent prove it left
// the policy dataplane alone.
func TestAgentRestartRewritesNothing(t *testing.T) {
	apply(t, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "from-y"}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: *sel("pod", "a"),
		Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "y")}}}},
	}})
	_, node, err := shared.FindPod("x/a")
	if err != nil {
		t.Fatal(err)
	}
	counters := func() string {
		// iptables-save (nft) fails when it lists a set that the agent
		// replaces at that moment ("Set with index 0 in kernel doesn't
		// exist"); a second read sees the new one.
		var out string
		var err error
		for try := 0; try < 5; try++ {
			if out, err = shared.Exec(node.Name, "iptables-save", "-c", "-t", "filter"); err == nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		if err != nil {
			t.Fatal(err)
		}
		var lines []string
		for _, l := range strings.Split(out, "\n") {
			// Only this test's policy chain: others may still be going
			// away after earlier tests.
			if strings.Contains(l, policy.PolicyChain("x/from-y", false)) && strings.HasPrefix(l, "[") {
				lines = append(lines, l)
			}
		}
		return strings.Join(lines, "\n")
	}
	// Traffic that the policy chain counts, once the policy is in place.
	var before string
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, err := shared.ProbeEventually("y/a", "x/a", 80, false, false, 5*time.Second); err != nil {
			t.Fatal(err)
		}
		before = counters()
		if strings.Contains(before, "MARK") && !strings.HasPrefix(before, "[0:0]") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the policy chain never counted the allowed traffic:\n%s", before)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err := shared.KillAgent(node.Name); err != nil {
		t.Fatal(err)
	}
	// The lab restarts the agent; wait for its report.
	bins, _ := labtest.Binaries()
	deadline = time.Now().Add(30 * time.Second)
	for {
		out, err := labtest.Command(bins+"/sluicectl", "status", "--lab-dir", shared.Dir, "--node", node.Name, "-o", "json")
		if err == nil && strings.Contains(out, `"ready": true`) && !strings.Contains(out, `"ready": false`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent not ready after the restart: %v %s", err, out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(6 * time.Second) // past one periodic re-read
	if after := counters(); after != before {
		t.Errorf("policy chains were rewritten by the restart (counters changed):\nbefore:\n%s\nafter:\n%s", before, after)
	}
}
