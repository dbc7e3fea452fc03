package policy

import (
	"bytes"
	"fmt"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"sync/atomic"

	"github.com/sluice-net/sluice/internal/ipset"
	"github.com/sluice-net/sluice/internal/iptables"
)

// Dataplane writes rendered rulesets of one family into the kernel. It
// remembers what it wrote, so each change batch is one iptables-restore of
// only the changed chains, in the order ipsets, policy chains, endpoint
// chains, dispatch; deletions go the other way.
type Dataplane struct {
	ipt  *iptables.Runner
	ipv6 bool
	// chains and sets are what the kernel holds, as far as we know.
	chains map[string][]string
	sets   map[string]string // name -> type and entries, joined
	// gen counts writes to the kernel, so a concurrent Read can tell
	// whether it saw the latest.
	gen atomic.Uint64
}

// NewDataplane returns a writer that starts by reading the kernel.
func NewDataplane(ipt *iptables.Runner, ipv6 bool) *Dataplane {
	return &Dataplane{ipt: ipt, ipv6: ipv6}
}

// Stats says what one Apply changed.
type Stats struct {
	ChainsWritten, ChainsDeleted int
	SetsChanged, SetsDeleted     int
	Payload                      int // bytes sent to iptables-restore
}

// Changed reports whether anything was written.
func (s Stats) Changed() bool {
	return s.ChainsWritten+s.ChainsDeleted+s.SetsChanged+s.SetsDeleted > 0
}

// ownedChain says which filter chains the policy loop owns.
func ownedChain(name string) bool {
	if name == FromPodChain || name == ToPodChain {
		return true
	}
	for _, p := range []string{FromPodChain + "-", ToPodChain + "-", chainPrefix + "FW-", chainPrefix + "TW-", chainPrefix + "PI-", chainPrefix + "PE-"} {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return false
}

func ownedSet(name string) bool {
	for _, p := range []string{"S", "C", "N"} {
		for _, f := range []string{"4-", "6-"} {
			if strings.HasPrefix(name, setPrefix+p+f) {
				return true
			}
		}
	}
	return false
}

// ReadKernel forgets what the writer believes and reads the live state
// once: the next Apply then writes exactly what differs. This is how an
// agent starts over an existing dataplane (and then changes nothing that
// is already right), and how it recovers after a failed write.
func (d *Dataplane) ReadKernel() error {
	k, err := d.Read()
	if err != nil {
		return err
	}
	d.chains, d.sets = k.chains, k.sets
	return nil
}

// KernelState is what Read found in the kernel.
type KernelState struct {
	chains map[string][]string
	sets   map[string]string
	// gen is the writer's generation when the read began.
	gen uint64
}

// Read reads the policy loop's chains and sets from the kernel without
// touching the writer, so it may run beside Apply (the periodic re-read
// that brings back a deleted rule, chain or set runs so, because
// iptables-save of thousands of rules takes tens of milliseconds that a
// policy change should not wait for). Adopt decides whether the result
// is still current.
func (d *Dataplane) Read() (KernelState, error) {
	k := KernelState{gen: d.gen.Load()}
	bin := "iptables-" + string(d.ipt.Mode()) + "-save"
	if d.ipv6 {
		bin = "ip6tables-" + string(d.ipt.Mode()) + "-save"
	}
	out, err := exec.Command(bin, "-t", "filter").Output()
	if err != nil {
		return k, fmt.Errorf("%s: %w", bin, err)
	}
	k.chains = map[string][]string{}
	for _, l := range strings.Split(string(out), "\n") {
		switch {
		case strings.HasPrefix(l, ":"):
			name := strings.Fields(l[1:])[0]
			if ownedChain(name) {
				k.chains[name] = nil
			}
		case strings.HasPrefix(l, "-A "):
			name := strings.Fields(l)[1]
			if ownedChain(name) {
				k.chains[name] = append(k.chains[name], l)
			}
		}
	}
	names, err := ipset.Names(setPrefix)
	if err != nil {
		return k, err
	}
	k.sets = map[string]string{}
	for _, n := range names {
		if !ownedSet(n) || strings.Contains(n, "6-") != d.ipv6 {
			continue
		}
		// Unknown content: the next Apply compares members.
		k.sets[n] = "?"
	}
	return k, nil
}

// Adopt makes a Read the writer's belief, unless the writer wrote since
// the read began (the read may then predate that write). It reports
// whether it adopted the state.
func (d *Dataplane) Adopt(k KernelState) bool {
	if k.gen != d.gen.Load() {
		return false
	}
	d.chains, d.sets = k.chains, k.sets
	return true
}

// setSignature identifies a set's content. It is kept with the set: the
// loop hands the same Set to every Apply until its content changes.
func setSignature(s *Set) string {
	if s.signature == "" {
		s.signature = string(s.Type) + "|" + strings.Join(s.Entries, ",")
	}
	return s.signature
}

// Apply makes the kernel hold the ruleset.
func (d *Dataplane) Apply(rs *Ruleset) (Stats, error) {
	var st Stats
	if d.chains == nil || d.sets == nil {
		if err := d.ReadKernel(); err != nil {
			return st, err
		}
	}
	// 1. Sets first: a rule may only reference a set that exists.
	names := make([]string, 0, len(rs.Sets))
	for n := range rs.Sets {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		s := rs.Sets[n]
		sig := setSignature(s)
		if d.sets[n] == sig {
			continue
		}
		var entries []ipset.Entry
		for _, e := range s.Entries {
			en, err := ipset.ParseEntry(e)
			if err != nil {
				return st, err
			}
			entries = append(entries, en)
		}
		d.gen.Add(1)
		changes, err := ipset.Sync(n, string(s.Type), d.ipv6, entries)
		if err != nil {
			return st, err
		}
		if changes > 0 {
			st.SetsChanged++
		}
		d.sets[n] = sig
	}
	// 2. Chains: one transaction with every changed chain, then the
	// deletion of stale ones, once nothing references them.
	var changed []string
	for name, rules := range rs.Chains {
		if cur, ok := d.chains[name]; !ok || !slices.Equal(cur, rules) {
			changed = append(changed, name)
		}
	}
	var stale []string
	for name := range d.chains {
		if _, ok := rs.Chains[name]; !ok {
			stale = append(stale, name)
		}
	}
	if len(changed)+len(stale) > 0 {
		sort.Slice(changed, func(i, j int) bool {
			return chainOrder(changed[i]) < chainOrder(changed[j]) || chainOrder(changed[i]) == chainOrder(changed[j]) && changed[i] < changed[j]
		})
		sort.Slice(stale, func(i, j int) bool {
			return chainOrder(stale[i]) > chainOrder(stale[j]) || chainOrder(stale[i]) == chainOrder(stale[j]) && stale[i] < stale[j]
		})
		var b bytes.Buffer
		// Declaring a chain creates it, or flushes it for a full rewrite;
		// a chain whose old content is known is edited in place instead.
		edits := map[string][]string{}
		for _, name := range changed {
			if cur, ok := d.chains[name]; ok {
				if ops, ok := editChain(name, cur, rs.Chains[name]); ok {
					edits[name] = ops
					continue
				}
			}
			fmt.Fprintf(&b, ":%s - [0:0]\n", name)
		}
		for _, name := range stale {
			fmt.Fprintf(&b, ":%s - [0:0]\n", name)
		}
		for _, name := range changed {
			rules := rs.Chains[name]
			if ops, ok := edits[name]; ok {
				rules = ops
			}
			for _, r := range rules {
				b.WriteString(r + "\n")
			}
		}
		for _, name := range stale {
			fmt.Fprintf(&b, "-X %s\n", name)
		}
		st.Payload = b.Len()
		d.gen.Add(1)
		if err := d.ipt.Restore("filter", b.Bytes()); err != nil {
			d.chains = nil // unknown now: re-read before the next try
			return st, err
		}
		for _, name := range changed {
			d.chains[name] = slices.Clone(rs.Chains[name])
		}
		for _, name := range stale {
			delete(d.chains, name)
		}
		st.ChainsWritten, st.ChainsDeleted = len(changed), len(stale)
	}
	// 3. Sets no rule references any more.
	for n := range d.sets {
		if _, ok := rs.Sets[n]; ok {
			continue
		}
		d.gen.Add(1)
		if err := ipset.Destroy(n); err != nil {
			return st, err
		}
		delete(d.sets, n)
		st.SetsDeleted++
	}
	return st, nil
}

// editChain returns the iptables-restore lines that turn a chain's rules
// from cur into want in place: the rules between the common head and tail
// are deleted and the new ones inserted, by position. A policy added to
// or removed from an endpoint is then two lines rather than the endpoint's
// whole chain (a hundred rules at a thousand policies), which is most of
// a change's cost in iptables-restore; the other rules keep their
// counters too. It reports false when rewriting the chain is shorter.
func editChain(name string, cur, want []string) ([]string, bool) {
	head := 0
	for head < len(cur) && head < len(want) && cur[head] == want[head] {
		head++
	}
	tail := 0
	for tail < len(cur)-head && tail < len(want)-head && cur[len(cur)-1-tail] == want[len(want)-1-tail] {
		tail++
	}
	deletes, inserts := len(cur)-head-tail, want[head:len(want)-tail]
	if deletes+len(inserts) >= len(want)+1 {
		return nil, false
	}
	prefix := "-A " + name + " "
	ops := make([]string, 0, deletes+len(inserts))
	for range deletes {
		ops = append(ops, fmt.Sprintf("-D %s %d", name, head+1))
	}
	for i, r := range inserts {
		if !strings.HasPrefix(r, prefix) {
			return nil, false
		}
		ops = append(ops, fmt.Sprintf("-I %s %d %s", name, head+1+i, strings.TrimPrefix(r, prefix)))
	}
	return ops, true
}

// chainOrder ranks chains for writing: what is referenced comes first.
func chainOrder(name string) int {
	switch {
	case strings.HasPrefix(name, chainPrefix+"PI-"), strings.HasPrefix(name, chainPrefix+"PE-"):
		return 0
	case strings.HasPrefix(name, chainPrefix+"FW-"), strings.HasPrefix(name, chainPrefix+"TW-"):
		return 1
	case name == FromPodChain, name == ToPodChain:
		return 3
	default:
		return 2 // dispatch buckets
	}
}

// Remove deletes every chain and set of the policy loop in this family.
func (d *Dataplane) Remove() error {
	_, err := d.Apply(&Ruleset{Chains: map[string][]string{}, Sets: map[string]*Set{}})
	return err
}
