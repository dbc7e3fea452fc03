package manifeste2e

import (
	"net/netip"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// TestManifestWithoutPodCIDRs: on a cluster whose controller-manager
// allocates no pod CIDRs, the manifest's agents claim subnets themselves,
// and the demo's truth tables hold.
func TestManifestWithoutPodCIDRs(t *testing.T) {
	l := labtest.StartT(t, lab.Options{Nodes: 3, NoPodCIDR: true, CNI: lab.CNIManifest})
	ctx := ctxT(t)
	if err := l.ApplyManifest(ctx, labtest.Manifest()); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitAgentsReady(ctx); err != nil {
		t.Fatal(err)
	}
	network := netip.MustParsePrefix(lab.DefaultClusterCIDR)
	seen := map[string]bool{}
	for _, n := range l.Nodes {
		node, err := l.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(node.Spec.PodCIDRs) != 1 {
			t.Fatalf("node %s podCIDRs %v", n.Name, node.Spec.PodCIDRs)
		}
		p, err := netip.ParsePrefix(node.Spec.PodCIDRs[0])
		if err != nil || !network.Overlaps(p) || seen[p.String()] {
			t.Errorf("node %s claimed %v (%v); claimed so far %v", n.Name, node.Spec.PodCIDRs, err, seen)
		}
		seen[p.String()] = true
	}
	labtest.AssertDemo(t, l)
}
