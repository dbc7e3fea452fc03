package policy

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"sync/atomic"

	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/ipset"
	"github.com/sluice-net/sluice/internal/journal"
)

// Dataplane writes rendered rulesets of one family into the kernel. It
// remembers what it wrote, so each change batch is one iptables-restore of
// only the changed chains, in the order ipsets, policy chains, endpoint
// chains, dispatch; deletions go the other way.
type Dataplane struct {
	ipt  contract.RuleWriter
	ipv6 bool
	// chains and sets are what the kernel holds, as far as we know.
	chains map[string][]string
	sets   map[string]string // name -> type and entries, joined
	// setKeys are the keySignature of what was written to each set.
	setKeys map[string]string
	// gen counts writes to the kernel, so a concurrent Read can tell
	// whether it saw the latest.
	gen atomic.Uint64
	// refusedSets and refusedChains are what the kernel would not take.
	refusedSets, refusedChains map[string]refusal
	// setRefs caches referencedSets while sets are refused.
	setRefs map[string]setRefs
	// syncSet writes a set; ipset.Sync unless a test poisons it.
	syncSet func(name, typ string, ipv6 bool, want []ipset.Entry) (int, error)
}

// NewDataplane returns a writer that starts by reading the kernel.
func NewDataplane(ipt contract.RuleWriter, ipv6 bool) *Dataplane {
	return &Dataplane{ipt: ipt, ipv6: ipv6}
}

// Stats says what one Apply changed.
type Stats struct {
	ChainsWritten, ChainsDeleted int
	SetsChanged, SetsDeleted     int
	Payload                      int // bytes sent to iptables-restore
	// Failed lists the policy chains that fail closed because the kernel
	// refused them or a set they use.
	Failed []Failure
}

// Changed reports whether anything was written.
func (s Stats) Changed() bool {
	return s.ChainsWritten+s.ChainsDeleted+s.SetsChanged+s.SetsDeleted > 0
}

// ownedChain says which filter chains the policy loop owns.
func ownedChain(name string) bool { return chainKindOf(name).rank >= 0 }

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
	d.chains, d.sets = k.chains, map[string]string{}
	for n := range k.setKeys {
		d.sets[n] = "?" // the next Apply compares members
	}
	return nil
}

// KernelState is what Read found in the kernel.
type KernelState struct {
	chains map[string][]string
	// setKeys are the sets' types and entry keys (keySignature).
	setKeys map[string]string
	hooks   hookState
	// gen is the writer's generation when the read began.
	gen uint64
}

// Read reads the policy loop's chains, sets and hooks from the kernel
// without touching the writer, so it may run beside Apply: the periodic
// re-read that brings back a deleted rule, chain, set or set entry runs
// so, because iptables-save and set dumps of thousands of entries take
// tens of milliseconds that a policy change should not wait for. Adopt
// decides whether the result is still current.
func (d *Dataplane) Read() (KernelState, error) {
	k := KernelState{gen: d.gen.Load()}
	out, err := d.ipt.SaveTable("filter", false)
	if err != nil {
		return k, err
	}
	k.chains = map[string][]string{}
	for _, l := range strings.Split(out, "\n") {
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
	if k.hooks, err = readHooks(d.ipt, out); err != nil {
		return k, err
	}
	names, err := ipset.Names(setPrefix)
	if err != nil {
		return k, err
	}
	k.setKeys = map[string]string{}
	for _, n := range names {
		if !ownedSet(n) || strings.Contains(n, "6-") != d.ipv6 {
			continue
		}
		typ, keys, err := ipset.Content(n)
		if errors.Is(err, ipset.ErrNotExist) {
			continue // destroyed since it was listed
		} else if err != nil {
			return k, err
		}
		k.setKeys[n] = keySignature(typ, keys)
	}
	return k, nil
}

// keySignature identifies a set's type and entries without the nomatch
// flag, which is all a dump of the kernel tells.
func keySignature(typ string, keys []string) string {
	return typ + "|" + strings.Join(keys, ",")
}

// Adopt makes a Read the writer's belief, unless the writer wrote since
// the read began (the read may then predate that write). A set whose
// entries are as written keeps its belief; any other is synced again by
// the next Apply. It reports whether it adopted the state.
func (d *Dataplane) Adopt(k KernelState) bool {
	if k.gen != d.gen.Load() {
		return false
	}
	sets := make(map[string]string, len(k.setKeys))
	for n, keys := range k.setKeys {
		if d.setKeys[n] == keys && d.sets[n] != "" {
			sets[n] = d.sets[n]
		} else {
			sets[n] = "?"
		}
	}
	d.chains, d.sets = k.chains, sets
	// What the kernel refused is tried again: the cause may be gone.
	d.refusedSets, d.refusedChains = nil, nil
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

// Apply makes the kernel hold the ruleset. What the kernel refuses stays
// with the object that caused it: a set that cannot be written, or a
// policy chain iptables-restore rejects, turns that policy's chain into
// one that allows nothing (the pods it selects fail closed, as for a
// policy that cannot be converted), Stats.Failed says so, and everything
// else is programmed as usual. Only a failure of Sluice's own structure
// (endpoint and dispatch chains) fails the whole Apply.
func (d *Dataplane) Apply(rs *Ruleset) (Stats, error) {
	var st Stats
	if d.chains == nil || d.sets == nil {
		if err := d.ReadKernel(); err != nil {
			return st, err
		}
	}
	if d.refusedSets == nil {
		d.refusedSets, d.refusedChains = map[string]refusal{}, map[string]refusal{}
	}
	// 1. Sets first: a rule may only reference a set that exists.
	failedSets := d.applySets(rs.Sets, &st)
	// 2. Chains: what references a failed set, or what the kernel refused
	// before in the same form, fails closed instead.
	want := d.isolate(rs.Chains, failedSets, &st)
	changed, stale := d.diffChains(want)
	if len(changed)+len(stale) > 0 {
		if err := d.commit(want, changed, stale, &st); err != nil {
			klog.V(2).InfoS("policy rules refused as one transaction; writing each policy on its own", "ipv6", d.ipv6, "err", err)
			if err := d.commitEach(want, changed, stale, &st); err != nil {
				return st, err
			}
		}
	}
	// 3. Sets no rule references any more.
	for n := range d.sets {
		if _, ok := rs.Sets[n]; ok {
			continue
		}
		d.gen.Add(1)
		err := ipset.Destroy(n)
		d.gen.Add(1)
		if err != nil {
			return st, err
		}
		journal.Default.Add("policy", "set", "remove", n)
		delete(d.sets, n)
		delete(d.setKeys, n)
		delete(d.refusedSets, n)
		st.SetsDeleted++
	}
	return st, nil
}

// refusal is what the kernel would not take, and why: a set's signature,
// or a chain's rules. The same content is not tried again until the
// next re-read (Adopt forgets refusals), so a poisoned object costs one
// failed write per resync period, not one per change.
type refusal struct {
	content string
	reason  string
}

// Failure is an object the kernel would not take.
type Failure struct {
	// Chain is the policy chain that now allows nothing.
	Chain string
	// Set is the set that could not be written, when that was the cause.
	Set    string
	Reason string
}

// failClosed is the content of a policy chain that could not be
// programmed. A chain that only allows (every NetworkPolicy) then allows
// nothing, so only the end of its tier and the other policies decide. A
// chain that can deny, pass or log (Calico's) drops what it would have
// seen: returning would skip its Deny or Pass and let a later policy allow
// what it should not. The comments are fixed, so the chain is not
// rewritten on every sync.
func failClosed(chain string, rules []string) []string {
	if !allowOnly(rules) {
		return []string{fmt.Sprintf("-A %s -m comment --comment \"sluice could not program this policy; it drops what it selects (see sluicectl status)\" -j DROP", chain)}
	}
	return []string{fmt.Sprintf("-A %s -m comment --comment \"sluice could not program this policy; it allows nothing (see sluicectl status)\" -j RETURN", chain)}
}

// allowOnly reports whether a rendered policy chain only allows: no DROP
// or NFLOG target, and one mark (the accept mark) set.
func allowOnly(rules []string) bool {
	mark := ""
	for _, r := range rules {
		if strings.HasSuffix(r, " -j DROP") || strings.Contains(r, " -j NFLOG ") {
			return false
		}
		if _, m, ok := strings.Cut(r, " -j MARK --set-xmark "); ok {
			if mark != "" && m != mark {
				return false
			}
			mark = m
		}
	}
	return true
}

// applySets writes the sets that changed and returns the ones that could
// not be written, with the reason.
func (d *Dataplane) applySets(sets map[string]*Set, st *Stats) map[string]string {
	failed := map[string]string{}
	names := make([]string, 0, len(sets))
	for n := range sets {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		s := sets[n]
		sig := setSignature(s)
		if d.sets[n] == sig {
			continue
		}
		if r, ok := d.refusedSets[n]; ok && r.content == sig {
			failed[n] = r.reason
			continue
		}
		delete(d.refusedSets, n)
		changes, err := d.writeSet(s)
		if err != nil {
			// Unknown content now (it may exist half written, and is
			// destroyed once unused); the chains that use it fail closed.
			d.sets[n] = "?"
			d.refusedSets[n] = refusal{sig, err.Error()}
			failed[n] = err.Error()
			continue
		}
		if changes > 0 {
			st.SetsChanged++
			action := "change"
			if d.sets[n] == "" {
				action = "add"
			}
			journal.Default.Add("policy", "set", action, fmt.Sprintf("%s (%s, %d entries)", n, s.Type, len(s.Entries)))
		}
		d.sets[n] = sig
	}
	return failed
}

func (d *Dataplane) writeSet(s *Set) (int, error) {
	entries := make([]ipset.Entry, 0, len(s.Entries))
	for _, e := range s.Entries {
		en, err := ipset.ParseEntry(e)
		if err != nil {
			return 0, err
		}
		entries = append(entries, en)
	}
	keys := make([]string, 0, len(entries))
	for _, e := range entries {
		keys = append(keys, e.Key())
	}
	slices.Sort(keys)
	if d.setKeys == nil {
		d.setKeys = map[string]string{}
	}
	d.setKeys[s.Name] = keySignature(string(s.Type), slices.Compact(keys))
	// Before and after: a Read that began while the write was under way
	// must not be adopted (at 50,000 pods a write takes seconds).
	d.gen.Add(1)
	defer d.gen.Add(1)
	sync := ipset.Sync
	if d.syncSet != nil {
		sync = d.syncSet
	}
	return sync(s.Name, string(s.Type), d.ipv6, entries)
}

// isolate returns the chains to write: the wanted ones, except that a
// policy chain that references a failed set, or that the kernel refused
// in this very form before, is replaced by one that allows nothing.
func (d *Dataplane) isolate(chains map[string][]string, failedSets map[string]string, st *Stats) map[string][]string {
	if len(failedSets) == 0 && len(d.refusedChains) == 0 {
		return chains
	}
	out := maps.Clone(chains)
	for name, rules := range chains {
		if chainKindOf(name).rank != rankPolicy {
			continue
		}
		if r, ok := d.refusedChains[name]; ok {
			if r.content == strings.Join(rules, "\n") {
				out[name] = failClosed(name, rules)
				st.Failed = append(st.Failed, Failure{Chain: name, Reason: r.reason})
				continue
			}
			delete(d.refusedChains, name) // changed since: try it again
		}
		if len(failedSets) == 0 {
			continue
		}
		for _, set := range d.referencedSets(name, rules) {
			if why, ok := failedSets[set]; ok {
				out[name] = failClosed(name, rules)
				st.Failed = append(st.Failed, Failure{Chain: name, Set: set, Reason: why})
				break
			}
		}
	}
	for name := range d.refusedChains {
		if _, ok := chains[name]; !ok {
			delete(d.refusedChains, name) // gone: nothing to remember
		}
	}
	for name := range d.setRefs {
		if _, ok := chains[name]; !ok {
			delete(d.setRefs, name)
		}
	}
	sort.Slice(st.Failed, func(i, j int) bool { return st.Failed[i].Chain < st.Failed[j].Chain })
	return out
}

// referencedSets lists the sets a chain's rules match on. The renderer
// hands the same slice for a chain until the chain changes, so the answer
// is kept per chain while the slice is the same: a node with a poisoned
// set pays for the scan once per change, not once per policy per change.
func (d *Dataplane) referencedSets(chain string, rules []string) []string {
	if len(rules) == 0 {
		return nil
	}
	if c, ok := d.setRefs[chain]; ok && len(c.rules) == len(rules) && &c.rules[0] == &rules[0] {
		return c.sets
	}
	var out []string
	for _, r := range rules {
		f := strings.Fields(r)
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "--match-set" {
				out = append(out, f[i+1])
			}
		}
	}
	if d.setRefs == nil {
		d.setRefs = map[string]setRefs{}
	}
	d.setRefs[chain] = setRefs{rules, out}
	return out
}

// setRefs are the sets a chain's rules reference.
type setRefs struct {
	rules, sets []string
}

// diffChains returns the chains whose kernel content differs from want,
// in write order, and the stale ones, in deletion order.
func (d *Dataplane) diffChains(want map[string][]string) (changed, stale []string) {
	for name, rules := range want {
		if cur, ok := d.chains[name]; !ok || !slices.Equal(cur, rules) {
			changed = append(changed, name)
		}
	}
	for name := range d.chains {
		if _, ok := want[name]; !ok {
			stale = append(stale, name)
		}
	}
	sort.Slice(changed, func(i, j int) bool {
		ri, rj := chainKindOf(changed[i]).rank, chainKindOf(changed[j]).rank
		return ri < rj || ri == rj && changed[i] < changed[j]
	})
	sort.Slice(stale, func(i, j int) bool {
		ri, rj := chainKindOf(stale[i]).rank, chainKindOf(stale[j]).rank
		return ri > rj || ri == rj && stale[i] < stale[j]
	})
	return changed, stale
}

// commit writes changed chains and deletes stale ones in one
// iptables-restore transaction, which the kernel takes whole or not at
// all.
func (d *Dataplane) commit(want map[string][]string, changed, stale []string, st *Stats) error {
	var b bytes.Buffer
	// Declaring a chain creates it, or flushes it for a full rewrite; a
	// chain whose old content is known is edited in place instead.
	edits := map[string][]string{}
	for _, name := range changed {
		if cur, ok := d.chains[name]; ok {
			if ops, ok := editChain(name, cur, want[name]); ok {
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
		rules := want[name]
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
	st.Payload += b.Len()
	// Before and after: a Read that began while iptables-restore ran
	// (seconds for the first write at 50,000 pods) may have seen none of
	// it, and adopting it would write every chain again.
	d.gen.Add(1)
	err := d.ipt.Restore("filter", b.Bytes())
	d.gen.Add(1)
	if err != nil {
		return err
	}
	for _, name := range changed {
		action := "add"
		if _, ok := d.chains[name]; ok {
			action = "change"
		}
		journal.Default.Add("policy", "chain", action, fmt.Sprintf("%s (%d rules, %s)", name, len(want[name]), d.family()))
		d.chains[name] = slices.Clone(want[name])
	}
	for _, name := range stale {
		journal.Default.Add("policy", "chain", "remove", fmt.Sprintf("%s (%s)", name, d.family()))
		delete(d.chains, name)
	}
	st.ChainsWritten += len(changed)
	st.ChainsDeleted += len(stale)
	return nil
}

// commitEach is the way out when the transaction was refused: each
// changed policy chain is written on its own, one the kernel refuses
// fails closed and is remembered, and then Sluice's own chains go in one
// transaction. A failed transaction changes nothing in the kernel, so
// what the writer knows still holds.
func (d *Dataplane) commitEach(want map[string][]string, changed, stale []string, st *Stats) error {
	var rest []string
	for _, name := range changed {
		if chainKindOf(name).rank != rankPolicy {
			rest = append(rest, name)
			continue
		}
		err := d.commit(want, []string{name}, nil, st)
		if err == nil {
			continue
		}
		klog.InfoS("the kernel refused a policy chain; it allows nothing until the policy changes", "chain", name, "ipv6", d.ipv6, "err", err)
		d.refusedChains[name] = refusal{strings.Join(want[name], "\n"), err.Error()}
		st.Failed = append(st.Failed, Failure{Chain: name, Reason: err.Error()})
		closed := maps.Clone(want)
		closed[name] = failClosed(name, want[name])
		if err := d.commit(closed, []string{name}, nil, st); err != nil {
			return fmt.Errorf("writing the fail-closed chain %s: %w", name, err)
		}
		want[name] = closed[name]
	}
	if len(rest)+len(stale) == 0 {
		return nil
	}
	return d.commit(want, rest, stale, st)
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

// chainKind is one kind of chain the policy loop owns: its name prefix,
// and its rank in the order of writing (what is referenced first) and of
// deleting (the other way).
type chainKind struct {
	prefix string
	exact  bool // the name is the prefix itself
	rank   int
}

const (
	rankPolicy = iota
	rankPortSubset
	rankPortTree
	rankEndpoint
	rankDispatch
	rankTop
)

// chainKinds is every chain the policy loop owns.
var chainKinds = []chainKind{
	{chainPrefix + "PI-", false, rankPolicy},
	{chainPrefix + "PE-", false, rankPolicy},
	{chainPrefix + "FS-", false, rankPortSubset},
	{chainPrefix + "TS-", false, rankPortSubset},
	{chainPrefix + "FT-", false, rankPortTree},
	{chainPrefix + "TT-", false, rankPortTree},
	{chainPrefix + "FW-", false, rankEndpoint},
	{chainPrefix + "TW-", false, rankEndpoint},
	{chainPrefix + "FH-", false, rankEndpoint},
	{contract.FromPodChain + "-", false, rankDispatch},
	{contract.ToPodChain + "-", false, rankDispatch},
	{contract.FromPodChain, true, rankTop},
	{contract.ToPodChain, true, rankTop},
	{contract.ToHostChain, true, rankTop},
}

// chainKindOf returns the kind of a chain, or one with rank -1 for a chain
// the policy loop does not own.
func chainKindOf(name string) chainKind {
	for _, k := range chainKinds {
		if k.exact && name == k.prefix || !k.exact && strings.HasPrefix(name, k.prefix) {
			return k
		}
	}
	return chainKind{rank: -1}
}

// Remove deletes every chain and set of the policy loop in this family.
func (d *Dataplane) Remove() error {
	_, err := d.Apply(&Ruleset{Chains: map[string][]string{}, Sets: map[string]*Set{}})
	return err
}

func (d *Dataplane) family() string {
	if d.ipv6 {
		return "IPv6"
	}
	return "IPv4"
}
