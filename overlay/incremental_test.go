package overlay

import (
	"context"
	"fmt"
	"math/rand"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/nettest"
)

// kernelState is what the overlay wrote into the node's kernel, as text
// that two moments can be compared by: Sluice's routes, the device's
// permanent neighbours and FDB entries, the known-node set.
func (u *loopUnderTest) kernelState(t *testing.T, device bool) string {
	t.Helper()
	sorted := func(s string) string {
		lines := strings.Split(strings.TrimSpace(s), "\n")
		for i := range lines {
			lines[i] = strings.TrimSpace(lines[i]) // ip pads some lines
		}
		slices.Sort(lines)
		return strings.Join(lines, "\n")
	}
	out := "routes:\n" + sorted(u.run(t, "ip", "route", "show", "proto", "98"))
	if device {
		out += "\nneighbours:\n" + sorted(u.run(t, "ip", "neigh", "show", "dev", "vx-sluice.1", "nud", "permanent"))
		out += "\nfdb:\n" + sorted(u.run(t, "bridge", "fdb", "show", "dev", "vx-sluice.1", "state", "permanent"))
		set := u.run(t, "ipset", "list", "SLUICE-NODES4")
		_, members, _ := strings.Cut(set, "Members:\n")
		out += "\nknown nodes:\n" + sorted(members)
	}
	return out
}

// randomPeer is a random version of node-k: its subnet, address, backend
// data and InternalIP vary, including versions that cannot be programmed
// (no VTEP MAC; off the L2 segment for host-gw).
func randomPeer(r *rand.Rand, k int) *corev1.Node {
	subnet := fmt.Sprintf("10.244.%d.0/24", k)
	if r.Intn(3) == 0 {
		subnet = fmt.Sprintf("10.244.%d.0/24", 100+k)
	}
	ip := fmt.Sprintf("192.0.2.%d", k)
	switch r.Intn(4) {
	case 0:
		ip = fmt.Sprintf("192.0.2.%d", 100+k)
	case 1:
		ip = fmt.Sprintf("198.51.100.%d", k)
	}
	n := loopNode(fmt.Sprintf("node-%d", k), subnet, "vxlan", ip, r.Intn(5) != 0)
	if r.Intn(2) == 0 {
		n.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: fmt.Sprintf("203.0.113.%d", k)}}
	}
	return n
}

// settle waits until the loop has handled every Node event so far: it
// changes a sentinel Node and waits for its peer to show the change, after
// which every earlier event was delivered and its key taken from the queue,
// and then for the queue to be empty.
func (u *loopUnderTest) settle(t *testing.T, round int) {
	t.Helper()
	ip := fmt.Sprintf("192.0.2.%d", 200+round%50)
	sentinel := loopNode("node-99", "10.244.99.0/24", "vxlan", ip, true)
	if _, err := u.client.CoreV1().Nodes().Get(context.Background(), "node-99", metav1.GetOptions{}); apierrors.IsNotFound(err) {
		if _, err := u.client.CoreV1().Nodes().Create(context.Background(), sentinel, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	} else {
		u.update(t, sentinel)
	}
	u.eventually(t, "the sentinel's change is programmed", func() bool {
		for _, p := range u.loop.Status().Peers {
			if p.Node == "node-99" && p.PublicIP.String() == ip {
				return u.loop.queue.Len() == 0
			}
		}
		return false
	})
	time.Sleep(100 * time.Millisecond) // a key re-queued while it was being processed
	u.eventually(t, "the queue is empty", func() bool { return u.loop.queue.Len() == 0 })
}

// After random bursts of joins, leaves and updates of other Nodes, each
// handled by the incremental path alone, the kernel holds exactly what a
// full sync writes: the full sync that follows finds nothing to change.
func TestIncrementalEqualsFullSync(t *testing.T) {
	for _, backend := range []string{"vxlan", "host-gw"} {
		t.Run(backend, func(t *testing.T) {
			u := startLoopIn(t, nettest.NewNS(t), backend, loopNode("node-1", "10.244.1.0/24", "", "", false))
			device := backend == "vxlan"
			r := rand.New(rand.NewSource(int64(len(backend))))
			live := map[int]bool{}
			// The loop's own annotations, published by its first sync,
			// come back as a change of its Node and a second full sync:
			// let it pass before counting.
			u.eventually(t, "node-1's annotations are published", func() bool {
				self, err := u.client.CoreV1().Nodes().Get(context.Background(), "node-1", metav1.GetOptions{})
				return err == nil && self.Annotations[AnnBackendType] == backend
			})
			u.resync(t)
			u.settle(t, 49)
			fullSyncs := u.loop.Status().LastSync
			for round := 0; round < 12; round++ {
				for op := 0; op < 2+r.Intn(8); op++ {
					k := 2 + r.Intn(10)
					switch {
					case !live[k]:
						if _, err := u.client.CoreV1().Nodes().Create(context.Background(), randomPeer(r, k), metav1.CreateOptions{}); err != nil {
							t.Fatal(err)
						}
						live[k] = true
					case r.Intn(3) == 0:
						if err := u.client.CoreV1().Nodes().Delete(context.Background(), fmt.Sprintf("node-%d", k), metav1.DeleteOptions{}); err != nil {
							t.Fatal(err)
						}
						delete(live, k)
					default:
						u.update(t, randomPeer(r, k))
					}
				}
				u.settle(t, round)
				if !u.loop.Status().LastSync.Equal(fullSyncs) {
					t.Fatalf("round %d: a full sync ran; the incremental path was not what programmed the changes", round)
				}
				incremental := u.kernelState(t, device)
				repairs := u.loop.Status().Repairs
				before := driftRepairs(t, repairVXLANInput)
				u.resync(t)
				if full := u.kernelState(t, device); full != incremental {
					t.Fatalf("round %d: the full sync changed the kernel:\nincremental:\n%s\nfull:\n%s", round, incremental, full)
				}
				if got := u.loop.Status().Repairs; got.Total() != repairs.Total() || driftRepairs(t, repairVXLANInput) != before {
					t.Fatalf("round %d: the full sync wrote %+v (was %+v)", round, got, repairs)
				}
				fullSyncs = u.loop.Status().LastSync
			}
			if n := u.loop.peerSyncs.Load(); n < 20 {
				t.Errorf("only %d incremental syncs", n)
			}
			t.Logf("%d incremental syncs; final state:\n%s", u.loop.peerSyncs.Load(), u.kernelState(t, device))
		})
	}
}

// An incremental apply that failed (the device was gone) leaves the work
// to a full sync, which rebuilds everything; entries removed behind the
// loop's back after an incremental apply are put back by the next resync
// and counted as repairs, and the resync after that writes nothing.
func TestResyncRepairsIncrementalDrift(t *testing.T) {
	u := startLoop(t, loopNode("node-1", "10.244.1.0/24", "", "", false),
		loopNode("node-2", "10.244.2.0/24", "vxlan", "192.0.2.2", true))
	routes := func() string { return u.run(t, "ip", "route", "show", "proto", "98") }
	u.eventually(t, "node-2 is programmed", func() bool { return strings.Contains(routes(), "10.244.2.0/24 via") })

	// Failed: the device is gone when node-3 joins.
	u.run(t, "ip", "link", "del", "vx-sluice.1")
	if _, err := u.client.CoreV1().Nodes().Create(context.Background(), loopNode("node-3", "10.244.3.0/24", "vxlan", "192.0.2.3", true), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	u.eventually(t, "the full sync rebuilds both peers", func() bool {
		r := routes()
		return strings.Contains(r, "10.244.2.0/24 via 10.244.2.0 dev vx-sluice.1") && strings.Contains(r, "10.244.3.0/24 via 10.244.3.0 dev vx-sluice.1")
	})
	u.settle(t, 0)
	want := u.kernelState(t, true)

	// Stale: after node-4's incremental apply, its entries are changed
	// and removed behind the loop's back.
	if _, err := u.client.CoreV1().Nodes().Create(context.Background(), loopNode("node-4", "10.244.4.0/24", "vxlan", "192.0.2.4", true), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	u.settle(t, 1)
	want = u.kernelState(t, true)
	if !strings.Contains(want, "10.244.4.0/24 via 10.244.4.0 dev vx-sluice.1") {
		t.Fatalf("node-4 not programmed:\n%s", want)
	}
	u.run(t, "ip", "route", "replace", "10.244.4.0/24", "via", "192.0.2.9", "dev", "eth0", "proto", "98")
	u.run(t, "ip", "neigh", "del", "10.244.4.0", "dev", "vx-sluice.1")
	u.run(t, "bridge", "fdb", "del", VtepMAC("node-4", false).String(), "dev", "vx-sluice.1", "dst", "192.0.2.4")
	u.run(t, "ipset", "del", "SLUICE-NODES4", "192.0.2.4")
	repairs := u.loop.Status().Repairs
	u.resync(t)
	if got := u.kernelState(t, true); got != want {
		t.Errorf("the resync did not repair node-4:\nwant:\n%s\ngot:\n%s", want, got)
	}
	if got := u.loop.Status().Repairs; got.Total()-repairs.Total() != 3 {
		t.Errorf("repairs %+v after %+v: want 3 more (route, neighbour, FDB)", got, repairs)
	}
	repairs = u.loop.Status().Repairs
	u.resync(t)
	if got := u.loop.Status().Repairs; got.Total() != repairs.Total() {
		t.Errorf("a resync with nothing to repair wrote %+v (was %+v)", got, repairs)
	}
}

// With no Node event at all, the periodic resync still finds and repairs
// drift: the resyncs between repairs skip the re-read of the kernel, the
// one every RepairPeriod does not.
func TestPeriodicRepairWithoutNodeEvents(t *testing.T) {
	u := startLoopWith(t, nettest.NewNS(t), "vxlan", func(c *Config) {
		c.ResyncPeriod, c.RepairPeriod = 100*time.Millisecond, time.Second
	}, loopNode("node-1", "10.244.1.0/24", "", "", false), loopNode("node-2", "10.244.2.0/24", "vxlan", "192.0.2.2", true))
	routes := func() string { return u.run(t, "ip", "route", "show", "proto", "98") }
	u.eventually(t, "node-2 is programmed", func() bool { return strings.Contains(routes(), "10.244.2.0/24 via") })
	u.settle(t, 0)
	want := u.kernelState(t, true)
	before := u.loop.Status().Repairs
	u.run(t, "ip", "route", "del", "10.244.2.0/24")
	u.run(t, "ip", "neigh", "del", "10.244.2.0", "dev", "vx-sluice.1")
	u.run(t, "ipset", "del", "SLUICE-NODES4", "192.0.2.2")
	u.eventually(t, "the periodic repair puts node-2 back", func() bool { return u.kernelState(t, true) == want })
	if got := u.loop.Status().Repairs; got.Total()-before.Total() != 2 {
		t.Errorf("repairs %+v after %+v: want 2 more (route, neighbour)", got, before)
	}
}
