package overlay

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/metrics"
	"github.com/sluice-net/sluice/internal/nettest"
	"github.com/sluice-net/sluice/overlay/netconf"
	"github.com/sluice-net/sluice/overlay/srcfilter"
)

// loopNode is a Node as another agent publishes it.
func loopNode(name, podCIDR, backend, publicIP string, mac bool) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{}}, Spec: corev1.NodeSpec{PodCIDR: podCIDR, PodCIDRs: []string{podCIDR}}}
	if backend != "" {
		n.Annotations = map[string]string{AnnBackendType: backend, AnnPublicIP: publicIP, AnnBackendData: "null"}
		if mac {
			n.Annotations[AnnBackendData] = fmt.Sprintf(`{"VNI":1,"VtepMAC":"%s"}`, VtepMAC(name, false))
		}
	}
	return n
}

// loopUnderTest runs the overlay loop of node-1 inside a fresh namespace,
// against a fake API server, and stops it before the namespace goes.
type loopUnderTest struct {
	loop   *Loop
	client *fake.Clientset
	events *recorder
	netns  ns.NetNS
}

func startLoop(t *testing.T, nodes ...*corev1.Node) *loopUnderTest {
	n := nettest.NewNS(t)
	return startLoopIn(t, n, "vxlan", nodes...)
}

func startLoopIn(t *testing.T, n ns.NetNS, backend string, nodes ...*corev1.Node) *loopUnderTest {
	return startLoopWith(t, n, backend, func(*Config) {}, nodes...)
}

// startLoopWith is startLoopIn with changes to the loop's configuration.
func startLoopWith(t *testing.T, n ns.NetNS, backend string, edit func(*Config), nodes ...*corev1.Node) *loopUnderTest {
	name := nettest.Name(n)
	nettest.Run(t, "ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
	nettest.Run(t, "ip", "-n", name, "addr", "add", "192.0.2.1/24", "dev", "eth0")
	nettest.Run(t, "ip", "-n", name, "link", "set", "eth0", "up")
	nettest.Run(t, "ip", "-n", name, "link", "set", "eth1", "up")
	nc, err := netconf.Parse([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"` + backend + `"}}`))
	if err != nil {
		t.Fatal(err)
	}
	u := &loopUnderTest{client: fake.NewClientset(), events: &recorder{}, netns: n}
	for _, node := range nodes {
		if _, err := u.client.CoreV1().Nodes().Create(context.Background(), node, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	cfg := Config{NodeName: "node-1", Net: nc, Iface: InterfaceSelection{Ifaces: []string{"eth0"}}, ChecksumOffload: "on",
		RunDir: t.TempDir(), ResyncPeriod: time.Hour, IPTablesMode: iptables.ModeNFT}
	edit(&cfg)
	u.loop = New(cfg, u.client, u.events)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Do(func(ns.NetNS) error { return u.loop.Run(ctx) }) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("loop: %v", err)
		}
	})
	u.eventually(t, "the overlay is ready", func() bool { return u.loop.Ready() })
	return u
}

// eventually waits for cond, and fails the test if it does not come in 20
// seconds. Nothing about the time it took is asserted.
func (u *loopUnderTest) eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting until %s; status %+v", what, u.loop.Status())
}

func (u *loopUnderTest) problem(node string) (string, bool) {
	for _, p := range u.loop.Status().Peers {
		if p.Node == node && !p.IPv6 {
			return p.Problem, true
		}
	}
	return "", false
}

func (u *loopUnderTest) run(t *testing.T, argv ...string) string {
	return nettest.Run(t, "ip", append([]string{"netns", "exec", nettest.Name(u.netns)}, argv...)...)
}

func (u *loopUnderTest) update(t *testing.T, n *corev1.Node) {
	cur, err := u.client.CoreV1().Nodes().Get(context.Background(), n.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	n.ResourceVersion = cur.ResourceVersion
	if _, err := u.client.CoreV1().Nodes().Update(context.Background(), n, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
}

// resync makes the loop sync once with no Node input changed (an update
// of its own node's status, as the kubelet's heartbeat does), and waits
// for it.
func (u *loopUnderTest) resync(t *testing.T) {
	before := u.loop.Status().LastSync
	self, err := u.client.CoreV1().Nodes().Get(context.Background(), "node-1", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	self.Status.Conditions = append(self.Status.Conditions, corev1.NodeCondition{Type: "Heartbeat", Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now(), Reason: fmt.Sprint(time.Now().UnixNano())})
	if _, err := u.client.CoreV1().Nodes().UpdateStatus(context.Background(), self, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	u.eventually(t, "a sync after the heartbeat", func() bool { return u.loop.Status().LastSync.After(before) })
}

// recorder keeps the Events the loop records, with the object each is on.
type recorder struct {
	mu     sync.Mutex
	events []string // "NODE TYPE REASON MESSAGE"
}

func (r *recorder) Event(obj runtime.Object, typ, reason, msg string) {
	name := ""
	if ref, ok := obj.(*corev1.ObjectReference); ok {
		name = ref.Kind + "/" + ref.Name
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.events = append(r.events, strings.Join([]string{name, typ, reason, msg}, " "))
}

func (r *recorder) Eventf(obj runtime.Object, typ, reason, f string, args ...any) {
	r.Event(obj, typ, reason, fmt.Sprintf(f, args...))
}

func (r *recorder) AnnotatedEventf(obj runtime.Object, _ map[string]string, typ, reason, f string, args ...any) {
	r.Eventf(obj, typ, reason, f, args...)
}

// count returns how many events start with prefix ("Node/x Warning R").
func (r *recorder) count(prefix string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, e := range r.events {
		if strings.HasPrefix(e, prefix) {
			n++
		}
	}
	return n
}

func driftRepairs(t *testing.T, kind string) float64 {
	var m dto.Metric
	if err := metrics.DriftRepairs.WithLabelValues(kind).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

// A peer that cannot be programmed (a host-gw node off this node's
// segment, on the vxlan backend) is reported once, in the status and with
// an Event on its Node, while the good peer is programmed; fixed, it is
// programmed on the Node change and the problem clears.
func TestLoopReportsAndRecoversBadPeer(t *testing.T) {
	u := startLoop(t,
		loopNode("node-1", "10.244.1.0/24", "", "", false),
		loopNode("node-2", "10.244.2.0/24", "vxlan", "192.0.2.2", true),
		loopNode("node-3", "10.244.3.0/24", "host-gw", "203.0.113.3", false))
	u.eventually(t, "node-3 is reported", func() bool {
		p, _ := u.problem("node-3")
		return strings.Contains(p, "no VTEP MAC")
	})
	if p, ok := u.problem("node-2"); !ok || p != "" {
		t.Errorf("node-2: present %v, problem %q; want programmed", ok, p)
	}
	routes := u.run(t, "ip", "route", "show", "proto", "98")
	if !strings.Contains(routes, "10.244.2.0/24 via 10.244.2.0 dev vx-sluice.1 onlink") || strings.Contains(routes, "10.244.3.0/24") {
		t.Errorf("routes: want node-2's only:\n%s", routes)
	}
	// More syncs with the same problem record no more Events.
	u.resync(t)
	u.resync(t)
	if n := u.events.count("Node/node-3 Warning " + ReasonPeerNotProgrammed); n != 1 {
		t.Errorf("%d PeerNotProgrammed events on node-3 after three syncs, want 1: %v", n, u.events.events)
	}
	if n := u.events.count("Node/node-2 Warning"); n != 0 {
		t.Errorf("warnings on the good peer: %v", u.events.events)
	}

	u.update(t, loopNode("node-3", "10.244.3.0/24", "vxlan", "192.0.2.3", true))
	u.eventually(t, "node-3's problem clears", func() bool {
		p, ok := u.problem("node-3")
		return ok && p == ""
	})
	if routes := u.run(t, "ip", "route", "show", "proto", "98"); !strings.Contains(routes, "10.244.3.0/24 via 10.244.3.0 dev vx-sluice.1 onlink") {
		t.Errorf("fixed node-3 has no route:\n%s", routes)
	}
	if fdb := u.run(t, "bridge", "fdb", "show", "dev", "vx-sluice.1"); !strings.Contains(fdb, VtepMAC("node-3", false).String()+" dst 192.0.2.3") {
		t.Errorf("fixed node-3 has no FDB entry:\n%s", fdb)
	}
	if n := u.events.count("Node/node-3 Normal " + ReasonPeerProgrammed); n != 1 {
		t.Errorf("%d PeerProgrammed events on node-3, want 1: %v", n, u.events.events)
	}
}

// The known-node set follows the Node objects, the filter is in INPUT,
// and a flushed filter is repaired and counted as drift.
func TestLoopKeepsVXLANSourceFilter(t *testing.T) {
	behindNAT := loopNode("node-4", "10.244.4.0/24", "vxlan", "198.51.100.4", true)
	behindNAT.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.0.2.4"}, {Type: corev1.NodeHostName, Address: "node-4"}}
	u := startLoop(t,
		loopNode("node-1", "10.244.1.0/24", "", "", false),
		loopNode("node-2", "10.244.2.0/24", "vxlan", "192.0.2.2", true),
		loopNode("node-3", "10.244.3.0/24", "host-gw", "203.0.113.3", false),
		behindNAT)
	members := func() string { return u.run(t, "ipset", "list", "SLUICE-NODES4") }
	u.eventually(t, "the set holds every node", func() bool {
		m := members()
		return strings.Contains(m, "192.0.2.1\n") && strings.Contains(m, "192.0.2.2\n") && strings.Contains(m, "203.0.113.3\n") &&
			strings.Contains(m, "198.51.100.4\n") && strings.Contains(m, "192.0.2.4\n")
	})
	input := u.run(t, "iptables-nft", "-w", "-S", "INPUT")
	if !strings.Contains(input, "-j SLUICE-INPUT") {
		t.Errorf("no jump to SLUICE-INPUT:\n%s", input)
	}
	if chain := u.run(t, "iptables-nft", "-w", "-S", "SLUICE-INPUT"); !strings.Contains(chain, "--dport 8472 -m set --match-set SLUICE-NODES4 src -j RETURN") || !strings.Contains(chain, "-j DROP") {
		t.Errorf("SLUICE-INPUT:\n%s", chain)
	}

	moved := loopNode("node-2", "10.244.2.0/24", "vxlan", "192.0.2.22", true)
	u.update(t, moved)
	if err := u.client.CoreV1().Nodes().Delete(context.Background(), "node-3", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	u.eventually(t, "the set follows the nodes", func() bool {
		m := members()
		return strings.Contains(m, "192.0.2.22\n") && !strings.Contains(m, "192.0.2.2\n") && !strings.Contains(m, "203.0.113.3\n")
	})

	// Let the syncs that the Node events queued run out first: the repair
	// below must come from a sync that no Node change asked for.
	u.resync(t)
	u.resync(t)
	before := driftRepairs(t, repairVXLANInput)
	u.run(t, "iptables-nft", "-w", "-F", "SLUICE-INPUT")
	u.run(t, "ipset", "del", "SLUICE-NODES4", "192.0.2.22")
	u.resync(t)
	if chain := u.run(t, "iptables-nft", "-w", "-S", "SLUICE-INPUT"); !strings.Contains(chain, "-j DROP") {
		t.Errorf("flushed filter not repaired:\n%s", chain)
	}
	if !strings.Contains(members(), "192.0.2.22\n") {
		t.Errorf("deleted member not repaired:\n%s", members())
	}
	if got := driftRepairs(t, repairVXLANInput) - before; got != 2 {
		t.Errorf("vxlan-input drift repairs counted %v, want 2 (the chain and the set member)", got)
	}
}

// On another backend there is no VXLAN port to guard: a filter left by a
// former vxlan configuration is removed.
func TestLoopRemovesSourceFilterOffVXLAN(t *testing.T) {
	n := nettest.NewNS(t)
	nettest.Do(t, n, func() error {
		r, err := iptables.New(iptables.IPv4, iptables.ModeNFT)
		if err != nil {
			return err
		}
		flt := srcfilter.Filter{Port: 8472}
		if _, err := flt.SyncSet([]netip.Addr{netip.MustParseAddr("192.0.2.1")}); err != nil {
			return err
		}
		return flt.Apply(r)
	})
	u := startLoopIn(t, n, "host-gw", loopNode("node-1", "10.244.1.0/24", "", "", false))
	u.eventually(t, "the filter is gone", func() bool {
		return !strings.Contains(u.run(t, "iptables-nft", "-w", "-S"), srcfilter.Chain) &&
			!strings.Contains(u.run(t, "ipset", "list", "-n"), srcfilter.Set4)
	})
}
