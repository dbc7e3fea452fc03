package forward

import (
	"fmt"
	"slices"
	"strings"

	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/iptables"
)

// Chains.
const (
	Chain = "SLUICE-FORWARD"
	// PodInterfaces matches the host side of every pod veth Sluice makes.
	PodInterfaces = contract.HostVethPrefix + "+"
	jumpComment   = "sluice: forwarding decision for pod traffic"
)

// Rules are the rules of SLUICE-FORWARD, as iptables-save prints them.
func Rules() []string { return rules() }

// JumpComment is the comment of the jump from FORWARD.
const JumpComment = jumpComment

func rules() []string {
	return []string{
		fmt.Sprintf("-A %s -i %s -m comment --comment \"egress policy of the sending pod\" -j %s", Chain, PodInterfaces, contract.FromPodChain),
		fmt.Sprintf("-A %s -o %s -m comment --comment \"ingress policy of the receiving pod\" -j %s", Chain, PodInterfaces, contract.ToPodChain),
		fmt.Sprintf("-A %s -i %s -m comment --comment \"pod traffic that policy allowed\" -j ACCEPT", Chain, PodInterfaces),
		fmt.Sprintf("-A %s -o %s -m comment --comment \"pod traffic that policy allowed\" -j ACCEPT", Chain, PodInterfaces),
	}
}

// Render returns the restore payload of SLUICE-FORWARD.
func Render() []byte {
	var b strings.Builder
	fmt.Fprintf(&b, ":%s - [0:0]\n", Chain)
	for _, r := range rules() {
		b.WriteString(r + "\n")
	}
	return []byte(b.String())
}

// Check reports whether the chain and the jump to it are as rendered.
func Check(r contract.HookWriter) bool {
	live, err := r.Rules("filter", Chain)
	if err != nil || !slices.Equal(live, rules()) {
		return false
	}
	for _, c := range []string{contract.FromPodChain, contract.ToPodChain} {
		if _, err := r.Rules("filter", c); err != nil {
			return false
		}
	}
	jumps, err := r.Rules("filter", "FORWARD")
	if err != nil || len(jumps) == 0 {
		return false
	}
	// Sluice's decision must come first, before anyone's blanket accept.
	return strings.HasSuffix(jumps[0], "-j "+Chain)
}

// Apply writes the chain, creates the policy chains if missing, and puts
// the jump first in FORWARD.
func Apply(r contract.HookWriter) error {
	for _, c := range []string{contract.FromPodChain, contract.ToPodChain, Chain} {
		if err := r.EnsureChain("filter", c); err != nil {
			return err
		}
	}
	if err := r.Restore("filter", Render()); err != nil {
		return fmt.Errorf("writing the forwarding chain: %w", err)
	}
	return EnsureFirstJump(r, "filter", "FORWARD", Chain, jumpComment)
}

// EnsureFirstJump makes a built-in chain's first rule the jump to one of
// Sluice's chains, moving it back to the top when someone inserted a rule
// above it: a blanket accept above it would skip Sluice's decision.
func EnsureFirstJump(r contract.HookWriter, table, from, to, comment string) error {
	jumps, err := r.Rules(table, from)
	if err != nil {
		return err
	}
	if len(jumps) > 0 && !strings.HasSuffix(jumps[0], "-j "+to) {
		if err := r.DeleteJump(table, from, to, comment); err != nil {
			return err
		}
	}
	return r.EnsureJump(table, from, to, comment)
}

// Remove deletes the jump and the chains (on uninstall, with the real
// runner: deleting chains is no part of the writer contract).
func Remove(r *iptables.Runner) error {
	if err := r.DeleteJump("filter", "FORWARD", Chain, jumpComment); err != nil {
		return err
	}
	for _, c := range []string{Chain, contract.FromPodChain, contract.ToPodChain} {
		if err := r.DeleteChain("filter", c); err != nil {
			return err
		}
	}
	return nil
}
