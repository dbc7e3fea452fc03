package iptables

import (
	"strings"
	"testing"

	"github.com/sluice-net/sluice/internal/nettest"
)

// The kubelet's canary chain in one backend decides the mode, and the
// other backend is refused.
func TestDetectAndRefuseMixedBackends(t *testing.T) {
	for _, kube := range []Mode{ModeLegacy, ModeNFT} {
		n := nettest.NewNS(t)
		nettest.Do(t, n, func() error {
			if m := DetectMode(); m != ModeNFT {
				t.Errorf("empty node: detected %s, want nft", m)
			}
			r, err := New(IPv4, kube)
			if err != nil {
				return err
			}
			if err := r.EnsureChain("mangle", "KUBE-KUBELET-CANARY"); err != nil {
				return err
			}
			if m := DetectMode(); m != kube {
				t.Errorf("kubelet in %s: detected %s", kube, m)
			}
			other := ModeNFT
			if kube == ModeNFT {
				other = ModeLegacy
			}
			if err := CheckMode(other); err == nil || !strings.Contains(err.Error(), "refusing to mix") {
				t.Errorf("CheckMode(%s) with the kubelet in %s: %v", other, kube, err)
			}
			if err := CheckMode(kube); err != nil {
				t.Errorf("CheckMode(%s): %v", kube, err)
			}
			return r.DeleteChain("mangle", "KUBE-KUBELET-CANARY")
		})
	}
}

func TestFailingLinesQuoteThePayload(t *testing.T) {
	got := failingLines("iptables-restore: line 3 failed", []byte("*filter\n:A - [0:0]\n-A A -j NOPE\nCOMMIT\n"))
	if !strings.Contains(got, "> 3: -A A -j NOPE") {
		t.Errorf("got %q", got)
	}
}
