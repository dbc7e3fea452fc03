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

// kube-proxy's chains outrank the kubelet's hint, which outranks rule
// counts: a node whose kubelet left a hint in one backend while
// kube-proxy writes the other follows kube-proxy.
func TestChooseFollowsKubeProxyFirst(t *testing.T) {
	many := BackendEvidence{Rules: 50}
	for _, c := range []struct {
		name        string
		nft, legacy BackendEvidence
		want        Mode
	}{
		{"empty node", BackendEvidence{}, BackendEvidence{}, ModeNFT},
		{"more legacy rules", BackendEvidence{Rules: 3}, many, ModeLegacy},
		{"kubelet in legacy beats rule count", many, BackendEvidence{Kubelet: true}, ModeLegacy},
		{"kubelet in both: nft", BackendEvidence{Kubelet: true}, BackendEvidence{Kubelet: true}, ModeNFT},
		{"kube-proxy in legacy beats the kubelet in nft", BackendEvidence{Kubelet: true}, BackendEvidence{KubeProxy: true}, ModeLegacy},
		{"kube-proxy in nft", BackendEvidence{KubeProxy: true}, BackendEvidence{Kubelet: true, Rules: 90}, ModeNFT},
		{"kube-proxy leftovers in both: the kubelet decides", BackendEvidence{KubeProxy: true}, BackendEvidence{KubeProxy: true, Kubelet: true}, ModeLegacy},
	} {
		if got := Choose(c.nft, c.legacy); got.Mode != c.want || got.Reason == "" {
			t.Errorf("%s: got %+v, want %s", c.name, got, c.want)
		}
	}
}

func TestEvidenceReadsChainDeclarations(t *testing.T) {
	save := "*mangle\n:PREROUTING ACCEPT [0:0]\n:KUBE-IPTABLES-HINT - [0:0]\n:KUBE-PROXY-CANARY - [0:0]\n" +
		"-A PREROUTING -j ACCEPT\n# Table `kube-proxy' is incompatible, use 'nft' tool.\nCOMMIT\n"
	if e := Evidence(save); e != (BackendEvidence{Rules: 1, KubeProxy: true, Kubelet: true}) {
		t.Errorf("got %+v", e)
	}
	// A comment naming a chain is no chain.
	if e := Evidence("-A FORWARD -m comment --comment KUBE-PROXY-CANARY -j ACCEPT\n"); e.KubeProxy || e.Rules != 1 {
		t.Errorf("got %+v", e)
	}
}
