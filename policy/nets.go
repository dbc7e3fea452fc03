package policy

import (
	"net/netip"
	"slices"
)

// This file is the one place that normalises address blocks, for the
// converters (an ipBlock's except list, Calico's nets) and for the sets
// the renderer fills with them.

// normaliseBlock normalises an ipBlock's excepts: "except is a slice of
// CIDRs that should not be included within an IPBlock". The API server
// accepts only excepts strictly inside the cidr; what else reaches us
// keeps its meaning by that sentence, in the form the renderer needs
// (each except strictly inside the cidr, once): an except outside the
// block, or of the other family, excludes nothing and is dropped, and one
// that holds the whole block leaves no address (empty).
func normaliseBlock(cidr netip.Prefix, except []netip.Prefix) (kept []netip.Prefix, empty bool) {
	for _, ex := range except {
		ex = ex.Masked()
		switch {
		case !ex.Overlaps(cidr): // outside the block, or the other family
		case ex.Bits() <= cidr.Bits():
			return nil, true // holds the whole block
		case !slices.Contains(kept, ex):
			kept = append(kept, ex)
		}
	}
	return kept, false
}

// ipBlockEntries returns the hash:net entries of a block: the block, then
// each except as a nomatch entry (hash:net picks the most specific entry,
// so an address in an except does not match). It returns nil when the
// excepts leave nothing.
//
// A hash:net set cannot hold a /0, so 0.0.0.0/0 and ::/0 become their two
// /1 halves: the set stays the one way every block is matched, and the
// except entries keep working inside it. An except that covers one half
// of a /0 removes that half, and the excepts inside it.
func ipBlockEntries(cidr netip.Prefix, except []netip.Prefix) []string {
	except, empty := normaliseBlock(cidr, except)
	if empty {
		return nil
	}
	blocks := []netip.Prefix{cidr}
	if cidr.Bits() == 0 {
		blocks = halves(cidr)
	}
	blocks = slices.DeleteFunc(blocks, func(b netip.Prefix) bool {
		return slices.ContainsFunc(except, func(e netip.Prefix) bool { return e.Bits() <= b.Bits() && e.Overlaps(b) })
	})
	if len(blocks) == 0 {
		return nil
	}
	var out []string
	for _, b := range blocks {
		out = append(out, b.String())
	}
	for _, e := range except {
		if !slices.Contains(blocks, e) && coveredBy(blocks, e) {
			out = append(out, e.String()+" nomatch")
		}
	}
	return out
}

// netEntries returns the hash:net entries of a list of nets of one
// family (Calico's nets, a network set): each once, a /0 as its halves.
func netEntries(nets []netip.Prefix, ipv6 bool) []string {
	var out []string
	for _, n := range nets {
		if n.Addr().Is6() != ipv6 {
			continue
		}
		blocks := []netip.Prefix{n.Masked()}
		if n.Bits() == 0 {
			blocks = halves(n)
		}
		for _, b := range blocks {
			if s := b.String(); !slices.Contains(out, s) {
				out = append(out, s)
			}
		}
	}
	return out
}

// halves splits a /0 into its two /1 halves.
func halves(all netip.Prefix) []netip.Prefix {
	lo := netip.PrefixFrom(all.Addr(), 1)
	hi := netip.IPv4Unspecified()
	if all.Addr().Is6() {
		hi = netip.IPv6Unspecified()
	}
	b := hi.AsSlice()
	b[0] = 0x80
	hiAddr, _ := netip.AddrFromSlice(b)
	return []netip.Prefix{lo, netip.PrefixFrom(hiAddr, 1)}
}

func coveredBy(blocks []netip.Prefix, p netip.Prefix) bool {
	for _, b := range blocks {
		if b.Contains(p.Addr()) && p.Bits() >= b.Bits() {
			return true
		}
	}
	return false
}
