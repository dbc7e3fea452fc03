package realnodee2e

import (
	"strings"
	"testing"
	"time"

	"github.com/sluice-net/sluice/cni"
	"github.com/sluice-net/sluice/internal/lab"
)

// TestHostPortFromAnotherNode: containerd passes a hostPort to the
// conflist's portmap, and a pod on another node reaches it at the node's
// address, as does the other node itself.
func TestHostPortFromAnotherNode(t *testing.T) {
	ctx := ctxT(t, 3*time.Minute)
	target, other := shared.Nodes[1], shared.Nodes[0]
	server := agnhostPod("hostport", "server", target.Name)
	server.Spec.Containers[0].Ports[0].HostPort = 30080
	createPod(t, ctx, server)
	client := createPod(t, ctx, agnhostPod("hostport", "client", other.Name))
	if err := connectEventually(ctx, "hostport", client.Name, "tcp", target.IP4, 30080, 30*time.Second); err != nil {
		t.Errorf("pod on %s -> %s:30080 (hostPort): %v", other.Name, target.IP4, err)
	}
	place, err := shared.Resolve(other.Name)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := lab.Probe(place, target.IP4, 30080, false, 3*time.Second); err != nil || got != "server" {
		t.Errorf("node %s -> %s:30080: %q, %v; want server", other.Name, target.IP4, got, err)
	}
	// The control: nothing listens on another host port.
	if err := connect(ctx, "hostport", client.Name, "tcp", target.IP4, 30081); err == nil {
		t.Errorf("connect to an unmapped host port succeeded; the probe cannot fail")
	}
}

// TestBandwidthAnnotation: the kubernetes.io/ingress-bandwidth and
// egress-bandwidth annotations reach the bandwidth plugin through
// containerd, which shapes the pod's host veth.
func TestBandwidthAnnotation(t *testing.T) {
	ctx := ctxT(t, 3*time.Minute)
	node := shared.Nodes[2]
	limited := agnhostPod("bandwidth", "limited", node.Name)
	limited.Annotations = map[string]string{"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "10M"}
	createPod(t, ctx, limited)
	createPod(t, ctx, agnhostPod("bandwidth", "free", node.Name))
	qdisc := func(pod string) string {
		out, err := shared.Exec(node.Name, "tc", "qdisc", "show", "dev", cni.HostVethName("bandwidth", pod, ""))
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	if q := qdisc("limited"); !strings.Contains(q, "tbf") || !strings.Contains(q, "rate 10Mbit") {
		t.Errorf("the limited pod's host veth has no 10Mbit token bucket:\n%s", q)
	}
	// The control: a pod without the annotations is not shaped.
	if q := qdisc("free"); strings.Contains(q, "tbf") {
		t.Errorf("a pod without bandwidth annotations is shaped:\n%s", q)
	}
}
