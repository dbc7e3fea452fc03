package srcfilter

import (
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"

	"github.com/sluice-net/sluice/internal/ipset"
	"github.com/sluice-net/sluice/internal/iptables"
)

const (
	// Chain is Sluice's own chain in the filter table.
	Chain = "SLUICE-INPUT"
	// Set4 and Set6 hold the known nodes' underlay addresses.
	Set4, Set6 = "SLUICE-NODES4", "SLUICE-NODES6"
	// SetType is the sets' ipset type.
	SetType     = "hash:ip"
	jumpComment = "sluice: VXLAN only from known nodes"
	// dropComment names the tunnel (see Filter.Tunnel).
	dropComment = "sluice: %s from an address that is not a known node"
	ourPrefix   = "SLUICE-"
)

// Filter is the source filter of one family.
type Filter struct {
	// Port is the overlay's tunnel UDP port: VXLAN's, or WireGuard's.
	Port int
	IPv6 bool
	// Tunnel names the tunnel in the drop rule's comment; empty is VXLAN.
	Tunnel string
}

// SetName is the family's set of known node addresses.
func (f Filter) SetName() string {
	if f.IPv6 {
		return Set6
	}
	return Set4
}

func (f Filter) tunnel() string {
	if f.Tunnel == "" {
		return "VXLAN"
	}
	return f.Tunnel
}

// rules are the chain's rules in the canonical form `iptables -S` prints,
// so the live chain can be compared with them.
func (f Filter) rules() []string {
	return []string{
		fmt.Sprintf("-A %s -p udp -m udp --dport %d -m set --match-set %s src -j RETURN", Chain, f.Port, f.SetName()),
		fmt.Sprintf("-A %s -p udp -m udp --dport %d -m comment --comment \"%s\" -j DROP", Chain, f.Port, fmt.Sprintf(dropComment, f.tunnel())),
	}
}

// Render returns the restore payload of the chain.
func (f Filter) Render() []byte {
	var b strings.Builder
	fmt.Fprintf(&b, ":%s - [0:0]\n", Chain)
	for _, r := range f.rules() {
		b.WriteString(r + "\n")
	}
	return []byte(b.String())
}

// SyncSet makes the family's set hold exactly these addresses (those of
// the other family are ignored) and returns how many entries it changed.
// It must run before Apply, whose rule references the set.
func (f Filter) SyncSet(addrs []netip.Addr) (int, error) {
	var entries []ipset.Entry
	seen := map[netip.Addr]bool{}
	for _, a := range addrs {
		a = a.Unmap()
		if a.IsValid() && a.Is6() == f.IPv6 && !seen[a] {
			seen[a] = true
			entries = append(entries, ipset.Entry{Prefix: netip.PrefixFrom(a, a.BitLen())})
		}
	}
	n, err := ipset.Sync(f.SetName(), SetType, f.IPv6, entries)
	if err != nil {
		return n, fmt.Errorf("syncing the known-node set %s: %w", f.SetName(), err)
	}
	return n, nil
}

// Check reports whether the chain is as rendered and INPUT jumps to it
// before any rule that is not Sluice's.
func (f Filter) Check(r *iptables.Runner) bool {
	live, err := r.Rules("filter", Chain)
	if err != nil || !slices.Equal(live, f.rules()) {
		return false
	}
	pos, err := jumpPosition(r)
	return err == nil && pos >= 0
}

// jumpPosition returns the index of the jump to Chain in INPUT, or -1 when
// it is missing or comes after a rule of another program (whose ACCEPT
// would let VXLAN through unfiltered). Other Sluice jumps may come first.
func jumpPosition(r *iptables.Runner) (int, error) {
	input, err := r.Rules("filter", "INPUT")
	if err != nil {
		return -1, fmt.Errorf("listing INPUT: %w", err)
	}
	for i, rule := range input {
		if strings.HasSuffix(rule, "-j "+Chain) {
			return i, nil
		}
		if !strings.Contains(rule, "-j "+ourPrefix) {
			return -1, nil
		}
	}
	return -1, nil
}

// Apply writes the chain and puts the jump to it first in INPUT. The set
// must exist (SyncSet).
func (f Filter) Apply(r *iptables.Runner) error {
	if err := r.EnsureChain("filter", Chain); err != nil {
		return err
	}
	if err := r.Restore("filter", f.Render()); err != nil {
		return fmt.Errorf("writing the VXLAN source filter: %w", err)
	}
	pos, err := jumpPosition(r)
	if err != nil {
		return err
	}
	if pos < 0 {
		// Missing, or below someone else's rule: (re)insert it at the top.
		if err := r.DeleteJump("filter", "INPUT", Chain, jumpComment); err != nil {
			return fmt.Errorf("moving the jump to %s: %w", Chain, err)
		}
	}
	return r.EnsureJump("filter", "INPUT", Chain, jumpComment)
}

// Remove deletes the jump, the chain and the family's set; what is
// missing is skipped.
func Remove(r *iptables.Runner, ipv6 bool) error {
	// Without the chain there is no jump (the kernel refuses a jump to a
	// missing chain), and iptables -C would fail over the target.
	if _, err := r.Rules("filter", Chain); err == nil {
		if err := r.DeleteJump("filter", "INPUT", Chain, jumpComment); err != nil {
			return fmt.Errorf("removing the jump to %s: %w", Chain, err)
		}
		if err := r.DeleteChain("filter", Chain); err != nil {
			return fmt.Errorf("removing %s: %w", Chain, err)
		}
	}
	if _, err := os.Stat("/sys/module/ip_set"); err != nil {
		return nil // no ipset module, so no set; asking would load it
	}
	return ipset.Destroy(Filter{IPv6: ipv6}.SetName())
}
