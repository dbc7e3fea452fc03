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
	// AcceptChain accepts the pod traffic that Chain let through, from the
	// end of FORWARD.
	AcceptChain = "SLUICE-FORWARD-ACCEPT"
	// PodInterfaces matches the host side of every pod veth Sluice makes.
	PodInterfaces = contract.HostVethPrefix + "+"
	jumpComment   = "sluice: forwarding decision for pod traffic"
	inputComment  = "sluice: policy of pod traffic to this node"
	acceptComment = "sluice: accept pod traffic that policy allowed, after the other rules of FORWARD"
)

// JumpComment is the comment of the jump from FORWARD.
const JumpComment = jumpComment

// AcceptComment is the comment of the jump to AcceptChain.
const AcceptComment = acceptComment

// InputComment is the comment of the jump from INPUT to
// contract.ToHostChain, which returns at once for anything but pod traffic.
const InputComment = inputComment

// Rules are the rules of SLUICE-FORWARD, as iptables-save prints them.
func Rules() []string {
	return []string{
		fmt.Sprintf("-A %s -i %s -m comment --comment \"egress policy of the sending pod\" -j %s", Chain, PodInterfaces, contract.FromPodChain),
		fmt.Sprintf("-A %s -o %s -m comment --comment \"ingress policy of the receiving pod\" -j %s", Chain, PodInterfaces, contract.ToPodChain),
	}
}

// AcceptRules are the rules of SLUICE-FORWARD-ACCEPT.
func AcceptRules() []string {
	return []string{
		fmt.Sprintf("-A %s -i %s -m comment --comment \"pod traffic that policy allowed\" -j ACCEPT", AcceptChain, PodInterfaces),
		fmt.Sprintf("-A %s -o %s -m comment --comment \"pod traffic that policy allowed\" -j ACCEPT", AcceptChain, PodInterfaces),
	}
}

// Render returns the restore payload of both chains.
func Render() []byte {
	var b strings.Builder
	fmt.Fprintf(&b, ":%s - [0:0]\n:%s - [0:0]\n", Chain, AcceptChain)
	for _, r := range append(Rules(), AcceptRules()...) {
		b.WriteString(r + "\n")
	}
	return []byte(b.String())
}

// Problems says what is wrong with the chains and the jumps to them, given
// the rules of INPUT, FORWARD, SLUICE-FORWARD and SLUICE-FORWARD-ACCEPT
// (as iptables-save or -S print them); nil when all is in place.
func Problems(input, forward, decision, accept []string) []string {
	var problems []string
	if !inputJumpEarly(input) {
		problems = append(problems, "INPUT does not jump to "+contract.ToHostChain+" before other programs' rules")
	}
	if len(forward) == 0 || !strings.HasSuffix(forward[0], "-j "+Chain) {
		problems = append(problems, "FORWARD does not jump to "+Chain+" first")
	}
	if !slices.ContainsFunc(forward, func(r string) bool { return strings.HasSuffix(r, "-j "+AcceptChain) }) {
		problems = append(problems, "FORWARD does not jump to "+AcceptChain)
	}
	if !slices.Equal(decision, Rules()) {
		problems = append(problems, Chain+" is not as written")
	}
	if !slices.Equal(accept, AcceptRules()) {
		problems = append(problems, AcceptChain+" is not as written")
	}
	return problems
}

// Check reports whether the chains and the jumps to them are as rendered.
func Check(r contract.HookWriter) bool {
	for _, c := range []string{contract.FromPodChain, contract.ToPodChain, contract.ToHostChain} {
		if _, err := r.Rules("filter", c); err != nil {
			return false
		}
	}
	input, err0 := r.Rules("filter", "INPUT")
	fwd, err1 := r.Rules("filter", "FORWARD")
	decision, err2 := r.Rules("filter", Chain)
	accept, err3 := r.Rules("filter", AcceptChain)
	if err0 != nil || err1 != nil || err2 != nil || err3 != nil {
		return false
	}
	// Rules lists rules as "-A CHAIN ...", as iptables-save does.
	return len(Problems(input, fwd, decision, accept)) == 0
}

// Apply writes the chains, creates the policy chains if missing, puts the
// decision first in FORWARD and makes sure the accept follows somewhere,
// and puts the jump for pod traffic to the node first in INPUT.
func Apply(r contract.HookWriter) error {
	for _, c := range []string{contract.FromPodChain, contract.ToPodChain, contract.ToHostChain, Chain, AcceptChain} {
		if err := r.EnsureChain("filter", c); err != nil {
			return err
		}
	}
	if err := r.Restore("filter", Render()); err != nil {
		return fmt.Errorf("writing the forwarding chains: %w", err)
	}
	if err := EnsureFirstJump(r, "filter", "FORWARD", Chain, jumpComment); err != nil {
		return err
	}
	if err := ensureInputJump(r); err != nil {
		return err
	}
	return r.EnsureAppendedJump("filter", "FORWARD", AcceptChain, acceptComment)
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

// inputJumpEarly reports whether INPUT jumps to contract.ToHostChain
// before any rule of another program (whose ACCEPT would skip it). The
// overlay's VXLAN source filter also jumps from the top of INPUT, and
// either of the two may come first.
func inputJumpEarly(input []string) bool {
	for _, rule := range input {
		if strings.HasSuffix(rule, "-j "+contract.ToHostChain) {
			return true
		}
		if !strings.Contains(rule, "-j SLUICE-") {
			return false
		}
	}
	return false
}

// ensureInputJump puts the jump to contract.ToHostChain at the top of
// INPUT unless it already comes before every other program's rule.
func ensureInputJump(r contract.HookWriter) error {
	input, err := r.Rules("filter", "INPUT")
	if err != nil {
		return err
	}
	if inputJumpEarly(input) {
		return nil
	}
	if err := r.DeleteJump("filter", "INPUT", contract.ToHostChain, inputComment); err != nil {
		return err
	}
	return r.EnsureJump("filter", "INPUT", contract.ToHostChain, inputComment)
}

// Remove deletes the jumps and the chains (on uninstall, with the real
// runner: deleting chains is no part of the writer contract).
func Remove(r *iptables.Runner) error {
	if err := r.DeleteJump("filter", "FORWARD", Chain, jumpComment); err != nil {
		return err
	}
	if err := r.DeleteJump("filter", "FORWARD", AcceptChain, acceptComment); err != nil {
		return err
	}
	if err := r.DeleteJump("filter", "INPUT", contract.ToHostChain, inputComment); err != nil {
		return err
	}
	for _, c := range []string{Chain, AcceptChain, contract.FromPodChain, contract.ToPodChain, contract.ToHostChain} {
		if err := r.DeleteChain("filter", c); err != nil {
			return err
		}
	}
	return nil
}
