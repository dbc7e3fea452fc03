package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/status"
)

// A wireguard node's status names the implementation and why, its key,
// and each peer's key where a vxlan node shows the VTEP MAC.
func TestPrintReportShowsWireGuard(t *testing.T) {
	key := "iigxR92AgkeJ17fAobmcDaGB57kzECTnKL3805k8dAw="
	hs := time.Now().Add(-7 * time.Second)
	r := &status.Report{Node: "node-1", Overlay: status.Overlay{Ready: true, Backend: "wireguard", MTU: 1420,
		Implementation: "userspace", ImplementationWhy: "auto: kernel has no WireGuard", PublicKey: key,
		Peers: []status.Peer{{Node: "node-2", Subnet: "10.244.1.0/24", PublicIP: "198.18.0.12", PublicKey: key, LastHandshake: &hs},
			{Node: "node-3", Subnet: "10.244.2.0/24", PublicIP: "198.18.0.13", PublicKey: key}}}}
	var b bytes.Buffer
	printReport(&b, r)
	out := b.String()
	for _, want := range []string{"backend wireguard", "wireguard userspace (auto: kernel has no WireGuard), public key " + key, "PUBLIC KEY", "node-2 ", "last handshake 7s ago", "no handshake yet"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "VTEP MAC") {
		t.Errorf("a wireguard node's status shows VTEP MACs:\n%s", out)
	}
}

// A node without a lease says why, in the words of the Event, instead of
// a line of empty fields.
func TestPrintReportSaysWhyThereIsNoLease(t *testing.T) {
	why := "PodCIDROutsideNetwork: the Node's podCIDR 10.99.7.0/24 is outside Sluice's Network 10.244.0.0/16; set --pod-network-cidr"
	var b bytes.Buffer
	printReport(&b, &status.Report{Node: "misfit", Overlay: status.Overlay{LastError: why}})
	out := b.String()
	if !strings.Contains(out, "overlay: NOT READY, no lease: "+why) {
		t.Errorf("status does not say why:\n%s", out)
	}
	if strings.Contains(out, "MTU 0") || strings.Contains(out, "(from )") {
		t.Errorf("status prints empty fields:\n%s", out)
	}
}
