package srcfilter

import (
	"fmt"
	"net/netip"

	"github.com/sluice-net/sluice/internal/ipset"
)

// AddMember puts one node address into the family's set, which SyncSet
// made: the path for one Node's change, where SyncSet would read and diff
// the whole set. An address already there is not an error.
func (f Filter) AddMember(a netip.Addr) error {
	a = a.Unmap()
	if err := ipset.Add(f.SetName(), ipset.Entry{Prefix: netip.PrefixFrom(a, a.BitLen())}); err != nil {
		return fmt.Errorf("adding a known node: %w", err)
	}
	return nil
}

// DelMember takes one node address out of the family's set; a missing one
// is not an error.
func (f Filter) DelMember(a netip.Addr) error {
	a = a.Unmap()
	if err := ipset.Del(f.SetName(), ipset.Entry{Prefix: netip.PrefixFrom(a, a.BitLen())}); err != nil {
		return fmt.Errorf("removing a node that is gone: %w", err)
	}
	return nil
}
