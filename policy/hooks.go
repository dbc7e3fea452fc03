package policy

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/forward"
)

// The policy loop owns the jumps that send pod traffic through its chains,
// and checks them with every re-read of the kernel, so a firewall reload
// that flushes them is put right by the loop that needs them, whatever the
// overlay loop is doing:
//
//	filter FORWARD    -> SLUICE-FORWARD (package forward) -> SLUICE-FROM-POD / SLUICE-TO-POD,
//	                  and last -> SLUICE-FORWARD-ACCEPT, after kube-proxy's rules
//	filter INPUT      -> SLUICE-TO-HOST: pod traffic to this node (hosttraffic.go)
//	raw    PREROUTING -> SLUICE-PREROUTING: anti-spoofing
//	filter, raw       SLUICE-CANARY: an empty chain nothing references;
//	                  when it is gone, someone flushed the table
//
// Anti-spoofing is a reverse-path check on every packet from a pod veth,
// in the raw table, before conntrack and before any policy: the host's
// route to each pod address goes through that pod's veth, so a source
// address that routes anywhere else is not the pod's own and the packet
// is dropped. That covers forwarded traffic (another pod's IP to pass an
// ingress rule; UDP needs no handshake) and traffic to the node itself (a
// crafted VXLAN packet with another node's source). Link-local sources
// route through the veth too, and the unspecified address of IPv6
// duplicate address detection passes rpfilter, so neighbour discovery
// keeps working; the node's probes are answered from the pod's own
// address.
const (
	PreroutingChain = chainPrefix + "PREROUTING"
	CanaryChain     = chainPrefix + "CANARY"
	antiSpoofJump   = "sluice: drop pod traffic with a source address that is not the pod's"
	antiSpoofReason = "source address is not one of the pod addresses"
)

func antiSpoofRules() []string {
	return []string{fmt.Sprintf("-A %s -i %s -m rpfilter --invert -m comment --comment %q -j DROP", PreroutingChain, forward.PodInterfaces, antiSpoofReason)}
}

// hookState is what a re-read found of the hooks of one family.
type hookState struct {
	// problem says what is wrong; "" when all is in place.
	problem string
	// flushed is set when a canary is gone: the whole table was flushed,
	// and nothing the writer believes of it holds.
	flushed bool
	// spoofDrops is the anti-spoofing rule's packet counter.
	spoofDrops uint64
}

// checkHooks reads the hooks from iptables-save output of the filter and
// raw tables (the raw one with counters).
func checkHooks(filter, raw string) hookState {
	var hs hookState
	var problems []string
	if !hasChain(filter, CanaryChain) || !hasChain(raw, CanaryChain) {
		hs.flushed = true
		problems = append(problems, "a table was flushed (canary chain gone)")
	}
	problems = append(problems, forward.Problems(chainRules(filter, "INPUT"), chainRules(filter, "FORWARD"), chainRules(filter, forward.Chain), chainRules(filter, forward.AcceptChain))...)
	if first := firstRule(raw, "PREROUTING"); !strings.HasSuffix(first, "-j "+PreroutingChain) {
		problems = append(problems, "raw PREROUTING does not jump to "+PreroutingChain+" first")
	}
	rules, counters := chainRulesCounted(raw, PreroutingChain)
	if !slices.Equal(rules, antiSpoofRules()) {
		problems = append(problems, PreroutingChain+" (anti-spoofing) is not as written")
	} else {
		hs.spoofDrops = counters[0]
	}
	hs.problem = strings.Join(problems, "; ")
	return hs
}

func hasChain(save, chain string) bool {
	return strings.Contains(save, "\n:"+chain+" ") || strings.HasPrefix(save, ":"+chain+" ")
}

func firstRule(save, chain string) string {
	rules, _ := chainRulesCounted(save, chain)
	if len(rules) == 0 {
		return ""
	}
	return rules[0]
}

func chainRules(save, chain string) []string {
	rules, _ := chainRulesCounted(save, chain)
	return rules
}

// chainRulesCounted returns a chain's rules without their counters, and
// the packet counters ("[packets:bytes] -A ..." in iptables-save -c).
func chainRulesCounted(save, chain string) ([]string, []uint64) {
	var rules []string
	var counters []uint64
	prefix := "-A " + chain + " "
	for _, l := range strings.Split(save, "\n") {
		var packets uint64
		if strings.HasPrefix(l, "[") {
			c, rest, ok := strings.Cut(l, "] ")
			if !ok {
				continue
			}
			p, _, _ := strings.Cut(strings.TrimPrefix(c, "["), ":")
			packets, _ = strconv.ParseUint(p, 10, 64)
			l = rest
		}
		if strings.HasPrefix(l, prefix) {
			rules = append(rules, l)
			counters = append(counters, packets)
		}
	}
	return rules, counters
}

// readHooks reads the hooks of one family from the kernel.
func readHooks(r contract.RuleWriter, filter string) (hookState, error) {
	raw, err := r.SaveTable("raw", true)
	if err != nil {
		return hookState{}, err
	}
	return checkHooks(filter, raw), nil
}

// applyHooks writes the hooks of one family: the canaries, the forwarding
// decision and anti-spoofing, each jump first in its built-in chain.
func applyHooks(r contract.HookWriter) error {
	for _, table := range []string{"filter", "raw"} {
		if err := r.EnsureChain(table, CanaryChain); err != nil {
			return err
		}
	}
	if err := forward.Apply(r); err != nil {
		return err
	}
	if err := r.EnsureChain("raw", PreroutingChain); err != nil {
		return err
	}
	payload := ":" + PreroutingChain + " - [0:0]\n" + strings.Join(antiSpoofRules(), "\n") + "\n"
	if err := r.Restore("raw", []byte(payload)); err != nil {
		return fmt.Errorf("writing the anti-spoofing chain: %w", err)
	}
	return forward.EnsureFirstJump(r, "raw", "PREROUTING", PreroutingChain, antiSpoofJump)
}
