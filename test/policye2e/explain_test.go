package policye2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os/exec"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/policy"
	"github.com/sluice-net/sluice/test/labtest"
)

// agentExplain asks the agent of a lab node to explain a flow, through
// the node's network namespace, as sluicectl explain does in a lab.
func agentExplain(node, from, to string, port int32, proto policy.Protocol) (*policy.Explanation, error) {
	place, err := shared.Resolve(node)
	if err != nil {
		return nil, err
	}
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
		return place.Dial(network, addr, 5*time.Second)
	}}}
	q := url.Values{"from": {from}, "to": {to}, "port": {strconv.Itoa(int(port))}, "proto": {string(proto)}}
	resp, err := client.Get("http://127.0.0.1:9098/explain?" + q.Encode())
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s: %s", resp.Status, body)
	}
	var x policy.Explanation
	return &x, json.Unmarshal(body, &x)
}

func nodeOf(t *testing.T, pod string) string {
	t.Helper()
	_, n, err := shared.FindPod(pod)
	if err != nil {
		t.Fatal(err)
	}
	return n.Name
}

// checkExplained asks the agents to explain every probed case of a table:
// egress on the source's node, ingress on the destination's. Their verdict
// must be the observed connectivity, they must name what the reference
// evaluator says decided (reason, policy and rule), and each node's kernel
// must hold what its model wants.
func checkExplained(t *testing.T, name string, got map[probeKey]bool, pols []*policy.Policy, eps map[string]policy.Endpoint) []string {
	t.Helper()
	ref := &policy.Evaluator{Policies: pols}
	var mu sync.Mutex
	var wrong []string
	sem := make(chan struct{}, 8)
	var wg sync.WaitGroup
	for k, observed := range got {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			problem := explainOne(t, k, observed, ref, eps)
			if problem != "" {
				mu.Lock()
				wrong = append(wrong, fmt.Sprintf("%s -> %s %s/%d: %s", k.from, k.to, k.proto, k.port, problem))
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	sort.Strings(wrong)
	return wrong
}

func explainOne(t *testing.T, k probeKey, observed bool, ref *policy.Evaluator, eps map[string]policy.Endpoint) string {
	src, dst := eps[k.from], eps[k.to]
	to := dst.IP.String() // the table's family
	out, err := agentExplain(nodeOf(t, k.from), k.from, to, k.port, k.proto)
	if err != nil {
		return "egress: " + err.Error()
	}
	in, err := agentExplain(nodeOf(t, k.to), k.from, to, k.port, k.proto)
	if err != nil {
		return "ingress: " + err.Error()
	}
	if v := out.Egress.Allowed && in.Ingress.Allowed; v != observed {
		return fmt.Sprintf("explain says allowed=%v (egress %q, ingress %q), observed %v", v, out.Egress.Summary, in.Ingress.Summary, observed)
	}
	f := policy.Flow{Src: src, Dst: dst, Proto: k.proto, DstPort: k.port}
	for _, c := range []struct {
		got    policy.DirectionVerdict
		egress bool
	}{{out.Egress, true}, {in.Ingress, false}} {
		want := ref.Explain(f, c.egress)
		if c.got.Reason != want.Reason || c.got.Rule != want.Rule || policyKey(c.got) != policyKey(want) {
			return fmt.Sprintf("%s: explain says %q, the reference %q", c.got.Direction, c.got.Summary, want.Summary)
		}
		if c.got.Reason == policy.ReasonSelf {
			continue // never leaves the pod: no rule is involved
		}
		if c.got.Kernel == nil {
			return c.got.Direction + ": no kernel check from the endpoint's own node"
		}
		if len(c.got.Kernel.Problems) > 0 || !c.got.Kernel.Programmed {
			return fmt.Sprintf("%s: model/kernel disagreement: %v", c.got.Direction, c.got.Kernel.Problems)
		}
		if len(c.got.Kernel.DecidingRules) == 0 {
			return fmt.Sprintf("%s: the deciding rule of %q is not in %s", c.got.Direction, c.got.Summary, c.got.Kernel.DecidingChain)
		}
	}
	return ""
}

func policyKey(v policy.DirectionVerdict) string {
	if v.Policy == nil {
		return ""
	}
	return v.Policy.Key
}

// TestExplainReportsDriftInTheKernel deletes the allowing rule of a policy
// by hand in the node's namespace: explain must report the disagreement
// (the agent puts the rule back within its resync period, so the delete
// is repeated until explain catches it), and none once it is repaired.
func TestExplainReportsDriftInTheKernel(t *testing.T) {
	apply(t,
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "deny"}},
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "from-y-to-a"}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: *sel("pod", "a"),
			Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "y")}}}},
		}})
	checkTable(t, "deny x, allow y -> x/a", []int32{80}, []policy.Protocol{policy.TCP})
	node := nodeOf(t, "x/a")
	ask := func() *policy.Explanation {
		x, err := agentExplain(node, "y/a", "x/a", 80, policy.TCP)
		if err != nil {
			t.Fatal(err)
		}
		return x
	}
	x := ask()
	if !x.Ingress.Allowed || policyKey(x.Ingress) != "x/from-y-to-a" || x.Ingress.Rule != 0 || x.Ingress.Kernel == nil {
		t.Fatalf("before the drift: %+v", x.Ingress)
	}
	if len(x.Ingress.Kernel.Problems) > 0 {
		t.Fatalf("control: disagreement before the drift: %v", x.Ingress.Kernel.Problems)
	}
	rule := x.Ingress.Kernel.DecidingRules[0]
	var problems []string
	for try := 0; try < 5 && len(problems) == 0; try++ {
		deleteRule(t, node, rule)
		problems = ask().Ingress.Kernel.Problems
	}
	if !slices.ContainsFunc(problems, func(p string) bool { return strings.Contains(p, "deciding rule is missing") }) {
		t.Fatalf("explain did not report the deleted rule %q: %v", rule, problems)
	}
	t.Logf("explain reported: %v", problems)
	deadline := time.Now().Add(20 * time.Second)
	for len(ask().Ingress.Kernel.Problems) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the agent did not repair the rule, or explain keeps reporting it")
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// deleteRule deletes one rule ("-A CHAIN spec...") in a node's
// namespace, with whichever iptables backend holds it.
func deleteRule(t *testing.T, node, rule string) {
	t.Helper()
	place, err := shared.Resolve(node)
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(rule)
	args := append([]string{"-t", "filter", "-D", f[1]}, f[2:]...)
	var errs []string
	for _, bin := range []string{"iptables-nft", "iptables-legacy", "iptables"} {
		if _, err := exec.LookPath(bin); err != nil {
			continue
		}
		out, err := place.Command(append([]string{bin}, args...)...).CombinedOutput()
		if err == nil {
			return
		}
		errs = append(errs, fmt.Sprintf("%s: %v %s", bin, err, out))
	}
	t.Logf("deleting %q: %v (already repaired or deleted?)", rule, errs)
}

// BenchmarkExplainInLab: sluicectl explain in the lab, as typed: process
// start, the lab's state, the agents of both pods' nodes through their
// namespaces, and their kernel reads.
func BenchmarkExplainInLab(b *testing.B) {
	bins, err := labtest.Binaries()
	if err != nil {
		b.Fatal(err)
	}
	var lat []time.Duration
	for i := 0; i < 30; i++ {
		t0 := time.Now()
		out, err := exec.Command(bins+"/sluicectl", "explain", "x/a", "y/b", "80", "--lab-dir", shared.Dir).CombinedOutput()
		if err != nil {
			b.Fatalf("%v\n%s", err, out)
		}
		lat = append(lat, time.Since(t0))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[15].Microseconds())/1000, "p50-ms")
	b.Logf("explain in the lab over 30 runs: p50 %v, p90 %v", lat[15], lat[27])
}

// TestExplainFlowToOwnNode: x/a's egress is denied by a NetworkPolicy, yet
// its traffic to its own node is not NetworkPolicy's to decide, and the
// agent finds the node's address in its own namespace and says so. The
// control: the same question about another node's address is a forwarded
// flow, denied.
func TestExplainFlowToOwnNode(t *testing.T) {
	apply(t, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "deny-egress-a"}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: *sel("pod", "a"),
		PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
	}})
	own := nodeOf(t, "x/a")
	var other *lab.Node
	for i := range shared.Nodes {
		if shared.Nodes[i].Name != own {
			other = &shared.Nodes[i]
			break
		}
	}
	ownNode, _ := shared.Node(own)
	deadline := time.Now().Add(20 * time.Second)
	for {
		x, err := agentExplain(own, "x/a", other.IP4, 80, policy.TCP)
		if err != nil {
			t.Fatal(err)
		}
		if !x.Egress.Allowed && x.Egress.Reason == policy.ReasonEndOfTier && !x.Egress.ToOwnNode && !x.To.OwnNode {
			break // the control: forwarded, and the policy is programmed
		}
		if time.Now().After(deadline) {
			t.Fatalf("control: x/a -> another node's %s should be forwarded and denied: %+v", other.IP4, x.Egress)
		}
		time.Sleep(300 * time.Millisecond)
	}
	x, err := agentExplain(own, "x/a", ownNode.IP4, 80, policy.TCP)
	if err != nil {
		t.Fatal(err)
	}
	if !x.Egress.Allowed || x.Egress.Reason != policy.ReasonOwnNode || !x.Egress.ToOwnNode || !x.To.OwnNode {
		t.Fatalf("x/a -> its own node %s: want allowed, reason %s, to own node: %+v (to %+v)", ownNode.IP4, policy.ReasonOwnNode, x.Egress, x.To)
	}
	if x.Egress.Kernel == nil || len(x.Egress.Kernel.Problems) > 0 || !x.Egress.Kernel.Programmed {
		t.Fatalf("x/a -> its own node: kernel check %+v", x.Egress.Kernel)
	}
	t.Logf("explained: %s", x.Egress.Summary)
}
