package policye2e

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"

	"github.com/sluice-net/sluice/policy"
	"github.com/sluice-net/sluice/test/labtest"
)

// waitEvent waits for an Event of a reason on a NetworkPolicy.
func waitEvent(t *testing.T, ns, name, reason string) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		evs, err := shared.Client.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: fields.Set{
			"involvedObject.kind": "NetworkPolicy", "involvedObject.name": name, "reason": reason}.String()})
		if err == nil && len(evs.Items) > 0 {
			return evs.Items[0].Message
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s Event on %s/%s (%v)", reason, ns, name, err)
		}
		time.Sleep(300 * time.Millisecond)
	}
}

// TestKernelRefusedPolicyFailsClosedAlone puts a real poisoned object in a
// real agent's kernel path: another program on node-1 holds an ipset of the
// name Sluice needs for an ipBlock, with another type, and uses it in a rule,
// so Sluice can neither use nor replace it. The policy must fail closed for
// its pod on that node and be reported; an unrelated policy created next
// must still be enforced within the usual bound; and once the other
// program's set is gone, the node converges by itself.
func TestKernelRefusedPolicyFailsClosedAlone(t *testing.T) {
	ctx := context.Background()
	xa, err := shared.Client.CoreV1().Pods("x").Get(ctx, "a", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	node := xa.Spec.NodeName
	block := netip.MustParsePrefix("192.0.2.0/24")
	set := policy.IPBlockSetName(block, nil, false)
	run := func(argv ...string) {
		t.Helper()
		if out, err := shared.Exec(node, argv...); err != nil {
			t.Fatalf("%v: %v\n%s", argv, err, out)
		}
	}
	run("ipset", "create", set, "hash:ip")
	run("iptables", "-A", "INPUT", "-m", "set", "--match-set", set, "src", "-m", "comment", "--comment", "another program", "-j", "ACCEPT")
	unpoison := func() {
		_, _ = shared.Exec(node, "iptables", "-D", "INPUT", "-m", "set", "--match-set", set, "src", "-m", "comment", "--comment", "another program", "-j", "ACCEPT")
		_, _ = shared.Exec(node, "ipset", "destroy", set)
	}
	t.Cleanup(unpoison)

	// Before: y/a reaches x/a (no policy on x/a).
	if got, err := shared.ProbeEventually("y/a", "x/a", 80, false, false, 5*time.Second); err != nil || got != "x/a" {
		t.Fatalf("control: y/a -> x/a before the policy: %q %v", got, err)
	}
	poisoned := ingressPolicy("x", "poisoned", "a", networkingv1.IPBlock{CIDR: block.String()})
	apply(t, poisoned)
	msg := waitEvent(t, "x", "poisoned", "PolicyNotRendered")
	if !strings.Contains(msg, "spec.ingress[0].from[0].ipBlock") || !strings.Contains(msg, node) {
		t.Errorf("the Event does not name the field and the node: %q", msg)
	}
	// Fails closed: the policy isolates x/a and its chain allows nothing.
	if got, err := shared.Probe("y/a", "x/a", 80, false, false); err == nil {
		t.Errorf("the pod of the refused policy is open: %q", got)
	}
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	status, err := labtest.Command(bins+"/sluicectl", "status", "--lab-dir", shared.Dir, "--node", node)
	if err != nil || !strings.Contains(status, "1 policies fail closed") || !strings.Contains(status, "x/poisoned") {
		t.Errorf("sluicectl status does not show the refused policy: %v\n%s", err, status)
	}
	// An unrelated change on the same node is enforced: a deny on y/a.
	apply(t, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "y", Name: "deny-a"}, Spec: networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a")}})
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := shared.Probe("z/a", "y/a", 80, false, false); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("an unrelated deny on the node was not enforced within 10 s")
		}
		time.Sleep(200 * time.Millisecond)
	}
	// The other program goes away: the agent tries again with its next
	// re-read and programs the policy.
	unpoison()
	waitEvent(t, "x", "poisoned", "PolicyProgrammed")
	out, err := shared.Exec(node, "ipset", "list", set, "-t")
	if err != nil || !strings.Contains(out, "hash:net") {
		t.Errorf("the set is not Sluice's after the fix: %v\n%s", err, out)
	}
}
