// Package overlaye2e proves sluiced's overlay loop in a real lab cluster:
// pods on different nodes reach each other over VXLAN, traffic to the
// outside world is masqueraded, the kernel state repairs itself, and bad
// configuration is reported clearly.
package overlaye2e

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

const dualStackNetConf = `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}`

var (
	shared *labtest.Lab
	agents *labtest.Agents
	// pods: one per node.
	pods = []string{"ov/a", "ov/b", "ov/c"}
)

func TestMain(m *testing.M) {
	labtest.Main(m, lab.Options{Nodes: 3, IPv6: true, CNI: lab.CNIReference}, &shared, labtest.AgentsWithPods(dualStackNetConf, pods, &agents, overlayRepairFlag))
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestPodToPodAcrossNodes(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		// The first IPv6 packets wait for duplicate address detection.
		for _, from := range pods {
			for _, to := range pods {
				if _, err := shared.ProbeEventually(from, to, 80, false, v6, 10*time.Second); err != nil {
					t.Fatalf("%s -> %s ipv6=%v: %v", from, to, v6, err)
				}
			}
		}
		for _, from := range pods {
			for _, to := range pods {
				for _, udp := range []bool{false, true} {
					got, err := shared.Probe(from, to, 81, udp, v6)
					if err != nil || got != to {
						t.Errorf("%s -> %s:81 udp=%v ipv6=%v: got %q, %v", from, to, udp, v6, got, err)
					}
				}
			}
		}
	}
}

func TestNodeToRemotePod(t *testing.T) {
	got, err := shared.ProbeEventually("node-1", "ov/c", 80, false, false, 5*time.Second)
	if err != nil || got != "ov/c" {
		t.Errorf("node-1 -> ov/c: %q, %v", got, err)
	}
}

func TestMasqueradeToOutside(t *testing.T) {
	for i, p := range pods {
		node := shared.Nodes[i]
		for _, v6 := range []bool{false, true} {
			want := "external from=" + node.IP4
			if v6 {
				want = "external from=" + node.IP6
			}
			got, err := shared.ProbeEventually(p, "external", lab.ExternalPort, false, v6, 5*time.Second)
			if err != nil || got != want {
				t.Errorf("%s -> external ipv6=%v: got %q, %v; want %q", p, v6, got, err, want)
			}
		}
	}
	// Pod to pod keeps its source: the answer names the pod, and the
	// overlay's own rule says so.
	rules, err := shared.Exec("node-1", "iptables", "-t", "nat", "-S", "SLUICE-POSTROUTING")
	if err != nil || !strings.Contains(rules, "-s 10.244.0.0/16 -d 10.244.0.0/16") {
		t.Errorf("no pod-to-pod exemption in the masquerade chain: %v\n%s", err, rules)
	}
}

// eventually polls check every 100ms for up to 10 s, the repair bound.
func eventually(check func() error) error { return eventuallyWithin(10*time.Second, check) }

// The agents here re-read the kernel for the overlay's own entries every
// 5 s, as they did before the repair period existed, so that each of
// TestKernelEntriesComeBack's cases waits seconds, not the default 30 s
// (the default's repair without Node events is overlay's unit test
// TestPeriodicRepairWithoutNodeEvents). overlayRepairBound is that
// period and a sync.
const (
	overlayRepairFlag  = "--overlay-repair-period=5s"
	overlayRepairBound = 15 * time.Second
)

func eventuallyWithin(bound time.Duration, check func() error) error {
	deadline := time.Now().Add(bound)
	for {
		err := check()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func contains(where, sub string, argv ...string) func() error {
	return func() error {
		out, err := shared.Exec(where, argv...)
		if err != nil {
			return err
		}
		if !strings.Contains(out, sub) {
			return fmt.Errorf("%q not in %s:\n%s", sub, strings.Join(argv, " "), out)
		}
		return nil
	}
}

// TestKernelEntriesComeBack deletes each kind of entry the overlay owns and
// watches it return.
func TestKernelEntriesComeBack(t *testing.T) {
	ctx := ctxT(t)
	n2, err := shared.Client.CoreV1().Nodes().Get(ctx, "node-2", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	subnet := n2.Spec.PodCIDRs[0]
	vtep := strings.TrimSuffix(subnet, "/24")
	n1, _ := shared.Client.CoreV1().Nodes().Get(ctx, "node-1", metav1.GetOptions{})
	own := n1.Spec.PodCIDRs[0]
	mac2 := macOf(t, n2)
	cases := []struct {
		name   string
		break_ []string
		check  func() error
		// kind is the sluice_drift_repairs_total series the repair counts in.
		kind string
	}{
		{"route", []string{"ip", "route", "del", subnet}, contains("node-1", subnet+" via "+vtep+" dev vx-sluice.1", "ip", "route"), "route"},
		{"blackhole", []string{"ip", "route", "del", "blackhole", own}, contains("node-1", "blackhole "+own, "ip", "route"), "route"},
		{"neighbour", []string{"ip", "neigh", "del", vtep, "dev", "vx-sluice.1"}, contains("node-1", vtep+" lladdr "+mac2, "ip", "neigh", "show", "dev", "vx-sluice.1"), "neighbour"},
		{"fdb", []string{"bridge", "fdb", "del", mac2, "dev", "vx-sluice.1", "dst", "198.18.0.12"}, contains("node-1", mac2+" dst 198.18.0.12", "bridge", "fdb", "show", "dev", "vx-sluice.1"), "fdb"},
		{"device", []string{"ip", "link", "del", "vx-sluice.1"}, contains("node-1", subnet+" via "+vtep+" dev vx-sluice.1", "ip", "route"), "device"},
		{"masquerade-rule", []string{"iptables", "-t", "nat", "-F", "SLUICE-POSTROUTING"}, contains("node-1", "MASQUERADE", "iptables", "-t", "nat", "-S", "SLUICE-POSTROUTING"), "masquerade"},
		{"masquerade-jump", []string{"iptables", "-t", "nat", "-D", "POSTROUTING", "-m", "comment", "--comment", "sluice: masquerade pod traffic leaving the cluster network", "-j", "SLUICE-POSTROUTING"},
			contains("node-1", "-j SLUICE-POSTROUTING", "iptables", "-t", "nat", "-S", "POSTROUTING"), "masquerade"},
		// The policy loop's hooks: put back by it, not by the overlay.
		{"forward-jump", []string{"iptables", "-D", "FORWARD", "-m", "comment", "--comment", "sluice: forwarding decision for pod traffic", "-j", "SLUICE-FORWARD"},
			contains("node-1", "-j SLUICE-FORWARD", "iptables", "-S", "FORWARD"), "policy-hook"},
		{"anti-spoofing-jump", []string{"iptables", "-t", "raw", "-F", "PREROUTING"},
			contains("node-1", "-j SLUICE-PREROUTING", "iptables", "-t", "raw", "-S", "PREROUTING"), "policy-hook"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if err := c.check(); err != nil {
				t.Fatalf("entry missing before the test: %v", err)
			}
			before := repairs(t, "node-1", c.kind)
			if _, err := shared.Exec("node-1", c.break_...); err != nil {
				t.Fatal(err)
			}
			bound := overlayRepairBound
			if c.kind == "policy-hook" {
				bound = 10 * time.Second // the policy loop's, every --resync-period
			}
			if err := eventuallyWithin(bound, c.check); err != nil {
				t.Fatalf("%s did not come back within %s: %v", c.name, bound, err)
			}
			// The sync that repaired the entry counts it when it ends.
			if err := eventually(func() error {
				if after := repairs(t, "node-1", c.kind); after <= before {
					return fmt.Errorf("sluice_drift_repairs_total{kind=%q} stayed at %v after the repair", c.kind, after)
				}
				return nil
			}); err != nil {
				t.Error(err)
			}
			if got, err := shared.ProbeEventually("ov/a", "ov/b", 80, false, false, 5*time.Second); err != nil || got != "ov/b" {
				t.Errorf("a -> b after repairing the %s: %q %v", c.name, got, err)
			}
		})
	}
}

// repairs reads a node agent's sluice_drift_repairs_total of one kind.
func repairs(t *testing.T, node, kind string) float64 {
	t.Helper()
	out, err := shared.Exec(node, "curl", "-sf", "http://127.0.0.1:9098/metrics")
	if err != nil {
		t.Fatalf("metrics of %s: %v", node, err)
	}
	prefix := fmt.Sprintf("sluice_drift_repairs_total{kind=%q} ", kind)
	for _, l := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(l, prefix); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatalf("%s's /metrics has no %s", node, prefix)
	return 0
}

func macOf(t *testing.T, n *corev1.Node) string {
	t.Helper()
	d := n.Annotations["flannel.alpha.coreos.com/backend-data"]
	i := strings.Index(d, `"VtepMAC":"`)
	if i < 0 {
		t.Fatalf("node %s has no VtepMAC: %q", n.Name, d)
	}
	return d[i+len(`"VtepMAC":"`) : i+len(`"VtepMAC":"`)+17]
}

// TestAgentRestartKeepsConnections kills the agents of both ends of a
// long-lived TCP connection with SIGKILL and restarts them; the connection
// carries on, and the restarted agents find nothing to change.
func TestAgentRestartKeepsConnections(t *testing.T) {
	ctx := ctxT(t)
	echo := shared.EchoConn(t, "ov/a", "ov/b", 9300, 3*time.Second)
	if err := echo("before"); err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"node-1", "node-2"} {
		agents.Kill(n)
	}
	if err := echo("while-down"); err != nil {
		t.Fatalf("connection broke while the agents were down: %v", err)
	}
	for _, n := range []string{"node-1", "node-2"} {
		if err := agents.Start(n); err != nil {
			t.Fatal(err)
		}
	}
	// Wait for the restarted agents to finish a sync.
	time.Sleep(2 * time.Second)
	if err := agents.WaitReady(ctx, "node-1", "node-2"); err != nil {
		t.Fatal(err)
	}
	if err := echo("after"); err != nil {
		t.Fatalf("connection broke across the agent restart: %v", err)
	}
	for _, n := range []string{"node-1", "node-2"} {
		log := agents.Log(n)
		if !strings.Contains(log, "overlay ready") {
			t.Errorf("%s: restarted agent never got ready:\n%s", n, log)
		}
		if strings.Contains(log, "overlay entries written") || strings.Contains(log, "masquerade rules repaired") {
			t.Errorf("%s: the restart rewrote kernel state that was already right:\n%s", n, log)
		}
	}
}

// ghostNode is a Node object with flannel annotations but no machine behind
// it, standing for a node about to be deleted.
func ghostNode(name, cidr, ip, mac string) *corev1.Node {
	return &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{
			"flannel.alpha.coreos.com/backend-type": "vxlan",
			"flannel.alpha.coreos.com/backend-data": `{"VNI":1,"VtepMAC":"` + mac + `"}`,
			"flannel.alpha.coreos.com/public-ip":    ip,
		}},
		Spec: corev1.NodeSpec{PodCIDR: cidr, PodCIDRs: []string{cidr}},
	}
}

func TestDeletedNodeEntriesDisappear(t *testing.T) {
	ctx := ctxT(t)
	nodes := shared.Client.CoreV1().Nodes()
	hasRoute := contains("node-1", "10.244.201.0/24 via 10.244.201.0 dev vx-sluice.1", "ip", "route")
	if _, err := nodes.Create(ctx, ghostNode("ghost-live", "10.244.201.0/24", "198.18.0.201", "0e:00:00:00:c9:01"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := eventually(hasRoute); err != nil {
		t.Fatalf("route to a new node never appeared: %v", err)
	}
	if err := nodes.Delete(ctx, "ghost-live", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := eventually(func() error {
		if hasRoute() == nil {
			return fmt.Errorf("route still there")
		}
		return contains("node-1", "", "true")()
	}); err != nil {
		t.Errorf("route of a deleted node remains: %v", err)
	}
	if out, _ := shared.Exec("node-1", "ip", "neigh", "show", "dev", "vx-sluice.1"); strings.Contains(out, "10.244.201.0") {
		t.Errorf("neighbour of a deleted node remains:\n%s", out)
	}

	// A node deleted while the agent is down is cleaned up at its start.
	if _, err := nodes.Create(ctx, ghostNode("ghost-offline", "10.244.202.0/24", "198.18.0.202", "0e:00:00:00:ca:01"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	hasOffline := contains("node-1", "10.244.202.0/24", "ip", "route")
	if err := eventually(hasOffline); err != nil {
		t.Fatal(err)
	}
	agents.Kill("node-1")
	if err := nodes.Delete(ctx, "ghost-offline", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := agents.Start("node-1"); err != nil {
		t.Fatal(err)
	}
	if err := eventually(func() error {
		if hasOffline() == nil {
			return fmt.Errorf("route of the node deleted while the agent was down remains")
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
	if fdb, _ := shared.Exec("node-1", "bridge", "fdb", "show", "dev", "vx-sluice.1"); strings.Contains(fdb, "0e:00:00:00:ca:01") {
		t.Errorf("FDB entry of the deleted node remains:\n%s", fdb)
	}
}
