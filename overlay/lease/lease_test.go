package lease

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/sluice-net/sluice/overlay/netconf"
)

func config(t *testing.T, js string) *netconf.Config {
	t.Helper()
	c, err := netconf.Parse([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func node(name string, cidrs ...string) *corev1.Node {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, UID: types.UID("uid-" + name)}}
	if len(cidrs) > 0 {
		n.Spec.PodCIDR, n.Spec.PodCIDRs = cidrs[0], cidrs
	}
	return n
}

func TestFromNodeSpec(t *testing.T) {
	ctx := context.Background()
	cs := fake.NewClientset(node("a", "10.244.3.0/24", "fd00:10:244:3::/64"))
	a := &Allocator{Client: cs, Config: config(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`)}
	l, err := a.Acquire(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if l.Source != FromNodeSpec || fmt.Sprint(l.Subnets) != "[10.244.3.0/24 fd00:10:244:3::/64]" {
		t.Errorf("lease = %+v", l)
	}
}

func TestPodCIDROutsideNetwork(t *testing.T) {
	cs := fake.NewClientset(node("a", "192.168.5.0/24"))
	a := &Allocator{Client: cs, Config: config(t, `{"Network":"10.244.0.0/16"}`)}
	_, err := a.Acquire(context.Background(), "a")
	e, ok := IsUserError(err)
	if !ok || e.Reason != ReasonOutsideNetwork {
		t.Fatalf("want %s, got %v", ReasonOutsideNetwork, err)
	}
	for _, want := range []string{"192.168.5.0/24", "10.244.0.0/16", "--pod-network-cidr", "podSubnet", "net-conf.json"} {
		if !contains(e.Message, want) {
			t.Errorf("message %q lacks %q", e.Message, want)
		}
	}
}

func TestPodCIDRMissingFamily(t *testing.T) {
	cs := fake.NewClientset(node("a", "10.244.1.0/24"))
	a := &Allocator{Client: cs, Config: config(t, `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/56"}`)}
	_, err := a.Acquire(context.Background(), "a")
	if e, ok := IsUserError(err); !ok || e.Reason != ReasonMissingFamily {
		t.Fatalf("want %s, got %v", ReasonMissingFamily, err)
	}
}

func TestSelfAllocateIsStableAndVisible(t *testing.T) {
	ctx := context.Background()
	cs := fake.NewClientset(node("a"), node("b", "10.244.7.0/24"))
	a := &Allocator{Client: cs, Config: config(t, `{"Network":"10.244.0.0/16"}`)}
	first, err := a.Acquire(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	if first.Source != SelfAllocated || len(first.Subnets) != 1 || first.Subnets[0].Bits() != 24 || first.Subnets[0] == netip.MustParsePrefix("10.244.7.0/24") {
		t.Fatalf("lease = %+v", first)
	}
	n, _ := cs.CoreV1().Nodes().Get(ctx, "a", metav1.GetOptions{})
	if n.Spec.PodCIDR != first.Subnets[0].String() {
		t.Errorf("node spec.podCIDR = %q, want %s", n.Spec.PodCIDR, first.Subnets[0])
	}
	claim, err := cs.CoordinationV1().Leases(Namespace).Get(ctx, ClaimName(first.Subnets[0]), metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(claim.OwnerReferences) != 1 || claim.OwnerReferences[0].UID != "uid-a" {
		t.Errorf("claim is not owned by the node: %+v", claim.OwnerReferences)
	}
	again, err := a.Acquire(ctx, "a")
	if err != nil || again.Subnets[0] != first.Subnets[0] {
		t.Errorf("second Acquire = %+v, %v; want %s", again, err, first.Subnets[0])
	}
}

// A restart after the claim but before the node was patched finds the
// claim again instead of taking a second subnet.
func TestSelfAllocateFindsOwnClaim(t *testing.T) {
	ctx := context.Background()
	n := node("a")
	cs := fake.NewClientset(n)
	p := netip.MustParsePrefix("10.244.9.0/24")
	if _, err := cs.CoordinationV1().Leases(Namespace).Create(ctx, claimObject(n, p), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	a := &Allocator{Client: cs, Config: config(t, `{"Network":"10.244.0.0/16"}`)}
	l, err := a.Acquire(ctx, "a")
	if err != nil || l.Subnets[0] != p {
		t.Fatalf("got %+v, %v; want %s", l, err, p)
	}
}

func TestConcurrentAgentsGetDistinctSubnets(t *testing.T) {
	ctx := context.Background()
	var objs []*corev1.Node
	cs := fake.NewClientset()
	for i := 0; i < 20; i++ {
		n := node(fmt.Sprintf("n%d", i))
		objs = append(objs, n)
		if _, err := cs.CoreV1().Nodes().Create(ctx, n, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	cfg := config(t, `{"Network":"10.244.0.0/19"}`)
	var mu sync.Mutex
	got := map[netip.Prefix]string{}
	var wg sync.WaitGroup
	for _, n := range objs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l, err := (&Allocator{Client: cs, Config: cfg}).Acquire(ctx, n.Name)
			if err != nil {
				t.Error(err)
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if other, dup := got[l.Subnets[0]]; dup {
				t.Errorf("%s and %s both got %s", other, n.Name, l.Subnets[0])
			}
			got[l.Subnets[0]] = n.Name
		}()
	}
	wg.Wait()
	if len(got) != 20 {
		t.Errorf("got %d distinct subnets, want 20", len(got))
	}
}

func TestNetworkExhausted(t *testing.T) {
	ctx := context.Background()
	cs := fake.NewClientset(node("a"), node("b"), node("c"))
	a := &Allocator{Client: cs, Config: config(t, `{"Network":"10.0.0.0/29","SubnetLen":30}`)}
	for _, n := range []string{"a", "b"} {
		if _, err := a.Acquire(ctx, n); err != nil {
			t.Fatal(err)
		}
	}
	_, err := a.Acquire(ctx, "c")
	if e, ok := IsUserError(err); !ok || e.Reason != ReasonExhausted || !contains(e.Message, "SubnetLen") {
		t.Fatalf("want %s, got %v", ReasonExhausted, err)
	}
}

func TestFreeSubnetIPv6(t *testing.T) {
	taken := map[netip.Prefix]bool{netip.MustParsePrefix("fd00:10:244::/64"): true}
	p, ok := freeSubnet(netip.MustParsePrefix("fd00:10:244::/56"), 64, taken, 0)
	if !ok || p.String() != "fd00:10:244:1::/64" {
		t.Errorf("got %s %v", p, ok)
	}
	if ClaimName(p) != "sluice-subnet-fd00-10-244-1-64" {
		t.Errorf("claim name %s", ClaimName(p))
	}
}

func contains(s, sub string) bool {
	return len(sub) == 0 || (len(s) >= len(sub) && (s == sub || indexOf(s, sub) >= 0))
}

func indexOf(s, sub string) int {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return i
		}
	}
	return -1
}

// A new node waits for kube-controller-manager's podCIDR instead of racing
// it with a claim of its own.
func TestWaitsForControllerManager(t *testing.T) {
	ctx := context.Background()
	n := node("young")
	n.CreationTimestamp = metav1.Now()
	cs := fake.NewClientset(n)
	go func() {
		time.Sleep(300 * time.Millisecond)
		cur, _ := cs.CoreV1().Nodes().Get(ctx, "young", metav1.GetOptions{})
		cur.Spec.PodCIDR, cur.Spec.PodCIDRs = "10.244.42.0/24", []string{"10.244.42.0/24"}
		_, _ = cs.CoreV1().Nodes().Update(ctx, cur, metav1.UpdateOptions{})
	}()
	a := &Allocator{Client: cs, Config: config(t, `{"Network":"10.244.0.0/16"}`), PodCIDRGrace: 5 * time.Second}
	l, err := a.Acquire(ctx, "young")
	if err != nil || l.Source != FromNodeSpec || l.Subnets[0].String() != "10.244.42.0/24" {
		t.Fatalf("got %+v, %v; want the controller-manager's subnet", l, err)
	}
	// After the grace period, a node without podCIDR gets a claim.
	old := node("old")
	old.CreationTimestamp = metav1.NewTime(time.Now().Add(-time.Minute))
	cs2 := fake.NewClientset(old)
	a2 := &Allocator{Client: cs2, Config: config(t, `{"Network":"10.244.0.0/16"}`), PodCIDRGrace: 5 * time.Second}
	if l, err := a2.Acquire(ctx, "old"); err != nil || l.Source != SelfAllocated {
		t.Errorf("old node: %+v, %v", l, err)
	}
}
