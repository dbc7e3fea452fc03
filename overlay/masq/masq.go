package masq

import (
	"bytes"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/sluice-net/sluice/internal/iptables"
)

const (
	// Chain is Sluice's own chain in the nat table.
	Chain = "SLUICE-POSTROUTING"
	// jumpComment tags the one rule Sluice adds to POSTROUTING.
	jumpComment = "sluice: masquerade pod traffic leaving the cluster network"
	// kubeProxyMasqMark is the mark kube-proxy sets on packets it will
	// masquerade itself in KUBE-POSTROUTING.
	kubeProxyMasqMark = "0x4000/0x4000"
)

// Rules configure masquerade for one family.
type Rules struct {
	// Network is the cluster's pod network of this family.
	Network netip.Prefix
	// RandomFully uses fully random source ports, which avoids the SNAT
	// port race of conntrack; on kernels before 5.7 it corrupts VXLAN
	// checksums unless TX checksum offload is off (see the vxlan package).
	RandomFully bool
}

// rules returns the chain's rules in the canonical form `iptables -S`
// prints, so the live chain can be compared with them.
func (m Rules) rules() []string {
	multicast := "224.0.0.0/4"
	if m.Network.Addr().Is6() {
		multicast = "ff00::/8"
	}
	masq := "-j MASQUERADE"
	if m.RandomFully {
		masq += " --random-fully"
	}
	n := m.Network.String()
	return []string{
		fmt.Sprintf("-A %s -m mark --mark %s -m comment --comment \"kube-proxy masquerades these\" -j RETURN", Chain, kubeProxyMasqMark),
		fmt.Sprintf("-A %s -s %s -d %s -m comment --comment \"pod to pod keeps its source\" -j RETURN", Chain, n, n),
		fmt.Sprintf("-A %s -s %s ! -d %s -m comment --comment \"pod to outside\" %s", Chain, n, multicast, masq),
	}
}

// Render returns the restore payload of the chain.
func (m Rules) Render() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, ":%s - [0:0]\n", Chain)
	for _, r := range m.rules() {
		b.WriteString(r + "\n")
	}
	return b.Bytes()
}

// Apply writes the chain and hooks it into POSTROUTING.
func (m Rules) Apply(r *iptables.Runner) error {
	if err := r.EnsureChain("nat", Chain); err != nil {
		return err
	}
	if err := r.Restore("nat", m.Render()); err != nil {
		return fmt.Errorf("writing masquerade rules: %w", err)
	}
	return r.EnsureJump("nat", "POSTROUTING", Chain, jumpComment)
}

// Check reports whether the live chain and jump match the rendered rules.
func (m Rules) Check(r *iptables.Runner) (bool, error) {
	live, err := r.Rules("nat", Chain)
	if err != nil {
		return false, nil // a missing chain is drift, not an error
	}
	if !slices.Equal(live, m.rules()) {
		return false, nil
	}
	jumps, err := r.Rules("nat", "POSTROUTING")
	if err != nil {
		return false, err
	}
	for _, j := range jumps {
		if strings.HasSuffix(j, "-j "+Chain) {
			return true, nil
		}
	}
	return false, nil
}

// Remove deletes the jump and the chain.
func Remove(r *iptables.Runner) error {
	if err := r.DeleteJump("nat", "POSTROUTING", Chain, jumpComment); err != nil {
		return err
	}
	return r.DeleteChain("nat", Chain)
}
