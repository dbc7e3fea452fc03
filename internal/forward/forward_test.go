package forward

import (
	"strings"
	"testing"

	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

func TestApplyKeepsPolicyChainsAndComesFirst(t *testing.T) {
	for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
		n := nettest.NewNS(t)
		nettest.Do(t, n, func() error {
			r, err := iptables.New(fam, iptables.ModeNFT)
			if err != nil {
				return err
			}
			// Another program's blanket accept, and a policy rule that the
			// policy loop wrote, must both survive.
			if err := r.Raw("-A", "FORWARD", "-s", map[iptables.Family]string{4: "10.244.0.0/16", 6: "fd00::/8"}[fam], "-j", "ACCEPT"); err != nil {
				return err
			}
			if err := r.EnsureChain("filter", contract.FromPodChain); err != nil {
				return err
			}
			if err := r.Raw("-A", contract.FromPodChain, "-j", "DROP"); err != nil {
				return err
			}
			if Check(r) {
				t.Error("Check passed before Apply")
			}
			if err := Apply(r); err != nil {
				return err
			}
			if !Check(r) {
				live, _ := r.Rules("filter", Chain)
				fwd, _ := r.Rules("filter", "FORWARD")
				t.Fatalf("Check after Apply failed:\n%s\nFORWARD:\n%s", strings.Join(live, "\n"), strings.Join(fwd, "\n"))
			}
			from, _ := r.Rules("filter", contract.FromPodChain)
			if len(from) != 1 || !strings.Contains(from[0], "DROP") {
				t.Errorf("the policy loop's rule was flushed: %v", from)
			}
			// The decision first, the other program's rule kept in
			// place, and the accept after it.
			fwd, _ := r.Rules("filter", "FORWARD")
			if len(fwd) != 3 || !strings.HasSuffix(fwd[0], "-j "+Chain) || !strings.HasSuffix(fwd[1], "-j ACCEPT") || !strings.HasSuffix(fwd[2], "-j "+AcceptChain) {
				t.Errorf("FORWARD = %v", fwd)
			}
			// Someone inserts above us: Check sees it, Apply moves us back.
			if err := r.Raw("-I", "FORWARD", "1", "-j", "ACCEPT"); err != nil {
				return err
			}
			if Check(r) {
				t.Error("Check missed a rule inserted above Sluice's jump")
			}
			if err := Apply(r); err != nil {
				return err
			}
			if !Check(r) {
				t.Error("Apply did not restore the jump's place")
			}
			if err := Remove(r); err != nil {
				return err
			}
			fwd, _ = r.Rules("filter", "FORWARD")
			for _, l := range fwd {
				if strings.Contains(l, "SLUICE") {
					t.Errorf("left after Remove: %s", l)
				}
			}
			return nil
		})
	}
}

// TestInputJumpComesBeforeOtherPrograms: INPUT jumps to the pod-to-node
// policy before any other program's rule; another Sluice jump (the VXLAN
// source filter's) may come first; a rule inserted above it is seen and
// the jump moved back; Remove takes it away.
func TestInputJumpComesBeforeOtherPrograms(t *testing.T) {
	n := nettest.NewNS(t)
	nettest.Do(t, n, func() error {
		r, err := iptables.New(iptables.IPv4, iptables.ModeNFT)
		if err != nil {
			return err
		}
		if err := Apply(r); err != nil {
			return err
		}
		input, _ := r.Rules("filter", "INPUT")
		if len(input) != 1 || !strings.HasSuffix(input[0], "-j "+contract.ToHostChain) {
			t.Fatalf("INPUT after Apply = %v", input)
		}
		if err := r.EnsureJump("filter", "INPUT", "SLUICE-INPUT", "another Sluice jump"); err != nil {
			return err
		}
		if !Check(r) {
			t.Error("Check failed with another Sluice jump first")
		}
		if err := r.Raw("-I", "INPUT", "1", "-j", "ACCEPT"); err != nil {
			return err
		}
		if Check(r) {
			t.Error("Check missed an ACCEPT inserted above the jump")
		}
		if err := Apply(r); err != nil {
			return err
		}
		input, _ = r.Rules("filter", "INPUT")
		if !Check(r) || !strings.HasSuffix(input[0], "-j "+contract.ToHostChain) {
			t.Errorf("Apply did not move the jump back up: %v", input)
		}
		if err := Remove(r); err != nil {
			return err
		}
		input, _ = r.Rules("filter", "INPUT")
		for _, l := range input {
			if strings.Contains(l, contract.ToHostChain) {
				t.Errorf("left after Remove: %s", l)
			}
		}
		return nil
	})
}
