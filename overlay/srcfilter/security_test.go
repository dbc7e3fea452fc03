package srcfilter

import (
	"net/netip"

	"testing"

	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

// TestVXLANOnlyFromKnownNodes: an outside host on the underlay builds its
// own VXLAN device toward the node (same VNI and port, the node's VTEP MAC
// from its annotations) and sends UDP to a pod with a source address of a
// pod on a known node. With the filter, nothing of it arrives; the same
// construction on the known peer node still delivers. Without the filter
// the attack does arrive, so the test would see a filter that does nothing.
func TestVXLANOnlyFromKnownNodes(t *testing.T) {
	for _, f := range fams {
		t.Run(f.name, func(t *testing.T) {
			hosts := lan(t, f, 3)
			node, peer, outsider := hosts[0], hosts[1], hosts[2]
			addPod(t, f, node)
			program(t, f, node, peer)
			// The inner source is a pod address on the known peer's
			// subnet: what an attacker borrows to pass an ingress policy.
			spoofed := f.pod(peer.i).Next()
			handTunnel(t, f, peer, node, spoofed)
			handTunnel(t, f, outsider, node, spoofed)
			pod := listen(t, node.pod, f.pod(node.i))

			if !sendUntil(t, outsider.ns, spoofed, f.pod(node.i), "attack-unfiltered", pod) {
				t.Fatal("without the filter the outside host's VXLAN did not reach the pod; the test cannot show anything")
			}
			fam := map[bool]iptables.Family{false: iptables.IPv4, true: iptables.IPv6}[f.v6]
			nettest.Do(t, node.ns, func() error {
				r, err := iptables.New(fam, iptables.ModeNFT)
				if err != nil {
					return err
				}
				flt := Filter{Port: 8472, IPv6: f.v6}
				// The known nodes: this node and its peer, not the outsider.
				if _, err := flt.SyncSet([]netip.Addr{f.underlay(node.i), f.underlay(peer.i)}); err != nil {
					return err
				}
				return flt.Apply(r)
			})

			for round := 0; round < 2; round++ {
				send(t, outsider.ns, spoofed, f.pod(node.i), "attack-filtered", 5)
				if !sendUntil(t, peer.ns, spoofed, f.pod(node.i), "control-"+string(rune('a'+round)), pod) {
					t.Fatalf("round %d: VXLAN from the known peer node did not arrive", round)
				}
			}
			if pod.has("attack-filtered") {
				t.Error("VXLAN from an outside host reached the pod through the filter")
			}
			if n := dropped(t, node, f.v6); n < 10 {
				t.Errorf("the DROP rule counted %d packets; want the 10 the outsider sent", n)
			}
		})
	}
}
