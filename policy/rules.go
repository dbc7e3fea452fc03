package policy

import (
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
)

// This file renders the chains of one endpoint and of one policy: the
// rules that must agree with the reference evaluator (eval.go).

// policiesOf looks up the policies of an endpoint's ordered key list.
func policiesOf(policies map[string]*Policy, keys []string) []*Policy {
	out := make([]*Policy, 0, len(keys))
	for _, k := range keys {
		if p := policies[k]; p != nil {
			out = append(out, p)
		}
	}
	return out
}

// endpointRules renders an endpoint's chain of one direction from the
// policies selecting it, in the order they apply: Felix's per-tier
// blocks. The accept mark is cleared once; each tier clears the pass mark,
// jumps to its policies while the pass mark is clear, returns as soon as
// one set the accept mark, and ends in a DROP unless its default action
// is Pass. After the last tier, what every tier passed on is allowed.
func (r *Renderer) endpointRules(chain string, policies []*Policy, egress bool) []string {
	rules := []string{
		fmt.Sprintf("-A %s -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN", chain),
		fmt.Sprintf("-A %s -m conntrack --ctstate INVALID -j DROP", chain),
	}
	if len(policies) == 0 {
		return append(rules, fmt.Sprintf("-A %s -m comment --comment \"no policy isolates this pod\" -j RETURN", chain))
	}
	pass := fmt.Sprintf("0x0/0x%x", r.passMark())
	rules = append(rules, fmt.Sprintf("-A %s -j MARK --set-xmark 0x0/0x%x", chain, r.AcceptMark|r.passMark()))
	for i := 0; i < len(policies); {
		tier := policies[i].tier()
		if i > 0 {
			rules = append(rules, fmt.Sprintf("-A %s -m comment --comment \"%s\" -j MARK --set-xmark %s", chain, comment("tier "+tier.Name), pass))
		}
		for ; i < len(policies) && policies[i].tier().Name == tier.Name; i++ {
			rules = append(rules,
				fmt.Sprintf("-A %s -m mark --mark %s -j %s", chain, pass, PolicyChain(policies[i].Key, egress)),
				fmt.Sprintf("-A %s -m mark --mark %s -j RETURN", chain, r.mark()))
		}
		if tier.DefaultAction != Pass {
			if r.DropLog {
				rules = append(rules, fmt.Sprintf("-A %s -m mark --mark %s %s", chain, pass, r.dropLogTarget(egress, DropPrefixTier(chainVeth(chain), egress, tier.Name))))
			}
			rules = append(rules, fmt.Sprintf("-A %s -m mark --mark %s -m comment --comment \"%s\" -j DROP", chain, pass,
				comment("end of tier "+tier.Name+": no policy allowed it")))
		}
	}
	return append(rules, fmt.Sprintf("-A %s -m comment --comment \"every tier passed it on\" -j RETURN", chain))
}

// setDef says what a set holds: fixed entries (an ipBlock, Calico nets)
// or entries contributed by each pod and network set (the IPs of the pods
// a selector matches and the nets of the network sets it matches, or the
// IP and port of the pods that declare a named port). A set's name is a
// hash of its definition, so equal names mean equal content, and sets are
// shared by every policy that needs them.
type setDef struct {
	name   string
	typ    SetType
	static []string
	// peer: the IPs of the pods it matches (and nets of network sets).
	peer *PodPeer
	// namedPort: "ip,proto:port" of the pods that declare it; a port on
	// the local endpoint's side only counts the pods the policy selects
	// (selectedBy).
	namedPort  string
	proto      Protocol
	selectedBy *Policy
	// field is where in the policy the set comes from, for reports.
	field string
}

// podEntries returns what one pod contributes to a set in this family.
func (r *Renderer) podEntries(d *setDef, pod *Pod, ns *Namespace) []string {
	var out []string
	switch {
	case d.peer != nil:
		if !d.peer.Matches(pod, ns) {
			return nil
		}
		for _, ip := range pod.IPs {
			if ip.Is6() == r.IPv6 {
				out = append(out, netip.PrefixFrom(ip, ip.BitLen()).String())
			}
		}
	case d.namedPort != "":
		if d.selectedBy != nil && !d.selectedBy.Selects(pod, ns) {
			return nil
		}
		np, ok := pod.NamedPorts[d.namedPort]
		if !ok || np.Protocol != d.proto {
			return nil
		}
		for _, ip := range pod.IPs {
			if ip.Is6() == r.IPv6 {
				out = append(out, fmt.Sprintf("%s,%s:%d", ip, strings.ToLower(string(d.proto)), np.Number))
			}
		}
	}
	return out
}

// netSetEntries returns what one network set contributes to a set in
// this family; ns is the network set's namespace (nil for a global one).
func (r *Renderer) netSetEntries(d *setDef, s *NetworkSet, ns *Namespace) []string {
	if d.peer == nil || !d.peer.MatchesSet(s, ns) {
		return nil
	}
	return netEntries(s.Nets, r.IPv6)
}

// policyRules renders one policy's chain of a direction, and the sets it
// refers to. It depends on the policy alone, so the loop renders a policy
// again only when the policy changes.
//
// Every rule ends in its action's target: Allow sets the accept mark,
// Pass the pass mark, Deny drops, Log goes to NFLOG. A run of Allow (or
// Pass) rules is followed by one return on its mark, so a later Deny
// never sees what an earlier Allow accepted; a chain of Allow rules only
// (every NetworkPolicy) has one return at its end.
func (r *Renderer) policyRules(p *Policy, egress bool) ([]string, []*setDef) {
	chain := PolicyChain(p.Key, egress)
	rules, field := p.IngressRules, "spec.ingress"
	if egress {
		rules, field = p.EgressRules, "spec.egress"
	}
	var out []string
	if p.Broken != "" && len(rules) == 0 {
		// Fail closed: the chain allows nothing, so the end of the tier
		// applies. (A broken policy that can deny brings a Deny of all.)
		return []string{fmt.Sprintf("-A %s -m comment --comment \"%s\" -j RETURN", chain, comment("broken policy allows nothing: "+p.Broken))}, nil
	}
	var defs []*setDef
	pending := "" // the mark a run of rules set, to return on
	flush := func() {
		if pending != "" {
			out = append(out, fmt.Sprintf("-A %s -m mark --mark %s -j RETURN", chain, pending))
			pending = ""
		}
	}
	for i := range rules {
		rule := &rules[i]
		lines, ruleDefs := r.ruleLines(p, rule, egress, chain, fmt.Sprintf("%s[%d]", field, i))
		if lines == nil {
			continue // cannot match in this family
		}
		defs = append(defs, ruleDefs...)
		target, mark := r.target(p, rule, egress, i)
		if mark != pending {
			flush()
		}
		if rule.action() == Log && len(lines) > 1 {
			// Alternatives of one Log rule log once: they flag the packet
			// with the pass bit, which is free here (the chain is entered
			// with it clear, and a run of Pass rules has returned on it),
			// and one rule logs the flagged packet and clears the flag.
			flag := fmt.Sprintf("0x%x/0x%x", r.passMark(), r.passMark())
			for _, l := range lines {
				out = append(out, l+" -j MARK --set-xmark "+flag)
			}
			out = append(out, fmt.Sprintf("-A %s -m mark --mark %s %s", chain, flag, target),
				fmt.Sprintf("-A %s -j MARK --set-xmark 0x0/0x%x", chain, r.passMark()))
			continue
		}
		for _, l := range lines {
			if r.DropLog && rule.action() == Deny {
				out = append(out, l+" "+r.dropLogTarget(egress, DropPrefixRule(p.Key, egress, i)))
			}
			out = append(out, l+" "+target)
		}
		pending = mark
	}
	if pending == "" && (len(out) == 0 || allAllow(rules)) {
		// A chain of Allow rules keeps the one return it always had, so a
		// NetworkPolicy chain reads as before.
		pending = r.mark()
	}
	flush()
	return out, defs
}

// allAllow reports whether every rule allows.
func allAllow(rules []Rule) bool {
	for i := range rules {
		if rules[i].action() != Allow {
			return false
		}
	}
	return true
}

// target is a rule's target, and the mark a run of such rules returns
// on ("" for targets that end or continue by themselves).
func (r *Renderer) target(p *Policy, rule *Rule, egress bool, index int) (target, mark string) {
	switch rule.action() {
	case Deny:
		return "-j DROP", ""
	case Pass:
		return fmt.Sprintf("-j MARK --set-xmark 0x%x/0x%x", r.passMark(), r.passMark()), fmt.Sprintf("0x%x/0x%x", r.passMark(), r.passMark())
	case Log:
		return fmt.Sprintf("-j NFLOG --nflog-prefix \"%s\" --nflog-group %d", LogPrefix(p.Key, egress, index), r.logGroup()), ""
	}
	return fmt.Sprintf("-j MARK --set-xmark %s", r.mark()), r.mark()
}

// LogPrefix is the NFLOG prefix of a policy's Log rule, in fields the
// drop logging can reuse: "sluice", the action (L for Log), the direction
// (I or E), the hash that names the policy's chain (SLUICE-PI-<hash>),
// and the rule's index in its direction. It stays within NFLOG's 64 bytes
// whatever the policy's name.
func LogPrefix(key string, egress bool, rule int) string {
	dir := "I"
	if egress {
		dir = "E"
	}
	return fmt.Sprintf("sluice|L|%s|%s|%d", dir, shortHash(key), rule)
}

// ruleLines renders a rule's matches, one line per combination of its
// alternatives (peers and ports), without the target; nil when the rule
// can never match in this family.
func (r *Renderer) ruleLines(p *Policy, rule *Rule, egress bool, chain, field string) ([]string, []*setDef) {
	if rule.IPVersion == 4 && r.IPv6 || rule.IPVersion == 6 && !r.IPv6 {
		return nil, nil
	}
	proto, ok := r.protoMatch(rule)
	if !ok {
		return nil, nil
	}
	var defs []*setDef
	// Each element is a list of alternatives; a line takes one of each.
	alts := [][]string{}
	add := func(a []string, d []*setDef) bool {
		defs = append(defs, d...)
		alts = append(alts, a)
		return a != nil
	}
	if m := r.icmpMatch(rule); m != "" {
		alts = append(alts, []string{m})
	}
	for _, end := range []struct {
		m     *Match
		dir   string
		local bool
	}{{&rule.Src, "src", egress}, {&rule.Dst, "dst", !egress}} {
		f := field + "." + end.dir
		if !add(r.peerMatches(end.m.Peers, end.dir, fieldFor(field, egress))) ||
			!add(r.netsMatch(end.m, end.dir, f)) ||
			!add(r.selectorMatch(end.m, end.dir, f)) ||
			!add(r.portMatches(p, end.m.Ports, end.dir, end.local, f+".ports")) ||
			!add(r.notPortsMatch(p, end.m.NotPorts, end.dir, end.local, f+".notPorts")) {
			return nil, nil
		}
	}
	lines := []string{"-A " + chain}
	for _, a := range alts {
		var next []string
		for _, l := range lines {
			for _, m := range a {
				if m == "" {
					next = append(next, l)
				} else {
					next = append(next, l+" "+m)
				}
			}
		}
		lines = next
	}
	var out []string
	for _, l := range lines {
		if l, ok := withProtocol(l, chain, proto); ok {
			out = append(out, mergePortMatches(l))
		}
	}
	if out == nil {
		return nil, nil
	}
	return out, defs
}

// mergePortMatches writes a rule's source and destination port matches
// of one protocol as one match at the place of the first, which is how the
// kernel keeps them: iptables-save prints "-m tcp --sport 1 ... -m tcp
// --dport 2" as "-m tcp --sport 1 --dport 2 ...".
func mergePortMatches(line string) string {
	for _, p := range []string{"tcp", "udp", "sctp"} {
		f := strings.Fields(line)
		first, opts := -1, []string(nil)
		var out []string
		for i := 0; i < len(f); i++ {
			if f[i] == "-m" && i+1 < len(f) && f[i+1] == p {
				j := i + 2
				for j+1 < len(f) && (f[j] == "--sport" || f[j] == "--dport") {
					opts = append(opts, f[j], f[j+1])
					j += 2
				}
				if first < 0 {
					first = len(out)
					out = append(out, "") // the merged match goes here
				}
				i = j - 1
				continue
			}
			out = append(out, f[i])
		}
		if first >= 0 {
			out[first] = strings.Join(append([]string{"-m", p}, opts...), " ")
			line = strings.Join(out, " ")
		}
	}
	return line
}

// fieldFor is the field a NetworkPolicy rule's peers come from.
func fieldFor(rule string, egress bool) string {
	if egress {
		return rule + ".to"
	}
	return rule + ".from"
}

// withProtocol puts a line's protocol first, where iptables-save prints
// it: the rule's own (ruleProto, "-p X" or "! -p X") and the one each
// port match brings must agree, or the line can match nothing (ok false).
func withProtocol(line, chain, ruleProto string) (string, bool) {
	f := strings.Fields(strings.TrimPrefix(line, "-A "+chain))
	want, neg := "", ""
	if p, ok := strings.CutPrefix(ruleProto, "! -p "); ok {
		neg = p
	} else if p, ok := strings.CutPrefix(ruleProto, "-p "); ok {
		want = p
	}
	// The address matches go first, then the protocol, as iptables-save
	// prints them.
	addrs := map[string]string{}
	var rest []string
	for i := 0; i < len(f); i++ {
		negated := f[i] == "!" && i+1 < len(f) && (f[i+1] == "-s" || f[i+1] == "-d")
		if negated {
			i++
		}
		switch {
		case (f[i] == "-s" || f[i] == "-d") && i+1 < len(f):
			m := f[i] + " " + f[i+1]
			if negated {
				m = "! " + m
			}
			addrs[f[i]] = m
			i++
		case f[i] == "-p" && i+1 < len(f):
			if want != "" && want != f[i+1] {
				return "", false
			}
			want = f[i+1]
			i++
		default:
			rest = append(rest, f[i])
		}
	}
	head := "-A " + chain
	for _, a := range []string{"-s", "-d"} {
		if m, ok := addrs[a]; ok {
			head += " " + m
		}
	}
	switch {
	case want != "" && want == neg:
		return "", false
	case want != "":
		head += " -p " + want
	case neg != "":
		head += " ! -p " + neg
	}
	if len(rest) == 0 {
		return head, true
	}
	return head + " " + strings.Join(rest, " "), true
}

// protoMatch renders the rule's protocol match; ok is false when the rule
// cannot match in this family (ICMP in IPv6, ICMPv6 in IPv4).
func (r *Renderer) protoMatch(rule *Rule) (string, bool) {
	if rule.Protocol == ICMP && r.IPv6 || rule.Protocol == ICMPv6 && !r.IPv6 {
		return "", false
	}
	switch {
	case rule.Protocol != "":
		return "-p " + iptProto(rule.Protocol), true
	case rule.NotProtocol != "":
		return "! -p " + iptProto(rule.NotProtocol), true
	}
	return "", true
}

// iptProto is a protocol as iptables-save prints it: by the name of the
// node's /etc/protocols, which iptables looks numbers up in, so "47"
// reads back as "gre" and a re-read finds nothing to rewrite.
func iptProto(p Protocol) string {
	switch p {
	case ICMPv6:
		return "ipv6-icmp"
	case "":
		return ""
	}
	if n, err := strconv.Atoi(string(p)); err == nil {
		if name, ok := protocolNames()[n]; ok {
			return name
		}
	}
	return strings.ToLower(string(p))
}

// protocolNames maps protocol numbers to their first name in
// /etc/protocols, read once.
var protocolNames = sync.OnceValue(func() map[int]string {
	names := map[int]string{}
	b, err := os.ReadFile("/etc/protocols")
	if err != nil {
		return names
	}
	for _, line := range strings.Split(string(b), "\n") {
		line, _, _ = strings.Cut(line, "#")
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		if n, err := strconv.Atoi(f[1]); err == nil {
			if _, seen := names[n]; !seen {
				names[n] = f[0]
			}
		}
	}
	return names
})

func (r *Renderer) icmpMatch(rule *Rule) string {
	m, neg := rule.ICMP, ""
	if m == nil {
		m, neg = rule.NotICMP, "! "
	}
	if m == nil {
		return ""
	}
	t := strconv.Itoa(int(m.Type))
	if m.Code >= 0 {
		t += "/" + strconv.Itoa(int(m.Code))
	}
	if r.IPv6 {
		return "-m icmp6 " + neg + "--icmpv6-type " + t
	}
	return "-m icmp " + neg + "--icmp-type " + t
}

// peerMatches returns one match per NetworkPolicy peer ("" for every
// peer), or nil when the peers can never match in this family, and the
// sets they use.
func (r *Renderer) peerMatches(peers []Peer, dir, field string) ([]string, []*setDef) {
	if peers == nil {
		return []string{""}, nil
	}
	var out []string
	var defs []*setDef
	for i := range peers {
		peer := &peers[i]
		if peer.Pods != nil {
			d := &setDef{name: r.selectorSetName(peer.Pods), typ: HashNet, peer: peer.Pods, field: fmt.Sprintf("%s[%d]", field, i)}
			defs = append(defs, d)
			out = append(out, fmt.Sprintf("-m set --match-set %s %s", d.name, dir))
			continue
		}
		if peer.CIDR.Addr().Is6() != r.IPv6 {
			continue
		}
		entries := ipBlockEntries(peer.CIDR, peer.Except)
		if entries == nil {
			continue // its excepts cover the whole block: it matches nothing
		}
		d := &setDef{name: r.cidrSetName(peer), typ: HashNet, static: entries, field: fmt.Sprintf("%s[%d].ipBlock", field, i)}
		defs = append(defs, d)
		out = append(out, fmt.Sprintf("-m set --match-set %s %s", d.name, dir))
	}
	return out, defs
}

// netsMatch renders nets and notNets: one set each, of this family's
// nets. nil when nets leave nothing in this family.
func (r *Renderer) netsMatch(m *Match, dir, field string) ([]string, []*setDef) {
	var parts []string
	var defs []*setDef
	// A single net is an address match of the rule itself, as Felix
	// writes it: no set to create, fill and keep (one rule has one -s and
	// one -d, so a second single net on the same end takes a set).
	addr := map[string]string{"src": "-s", "dst": "-d"}[dir]
	usedAddr := false
	if m.Nets != nil {
		entries := netEntries(m.Nets, r.IPv6)
		switch {
		case entries == nil:
			return nil, nil
		case len(entries) == 1:
			parts = append(parts, addr+" "+entries[0])
			usedAddr = true
		default:
			d := r.netsSet(entries, field+".nets")
			defs = append(defs, d)
			parts = append(parts, fmt.Sprintf("-m set --match-set %s %s", d.name, dir))
		}
	}
	if entries := netEntries(m.NotNets, r.IPv6); entries != nil {
		if len(entries) == 1 && !usedAddr {
			parts = append(parts, "! "+addr+" "+entries[0])
		} else {
			d := r.netsSet(entries, field+".notNets")
			defs = append(defs, d)
			parts = append(parts, fmt.Sprintf("-m set ! --match-set %s %s", d.name, dir))
		}
	}
	return []string{strings.Join(parts, " ")}, defs
}

func (r *Renderer) netsSet(entries []string, field string) *setDef {
	return &setDef{name: setPrefix + "C" + r.fam() + "-" + shortHash("nets="+strings.Join(entries, ",")), typ: HashNet, static: entries, field: field}
}

// selectorMatch renders a Calico selector and notSelector: the set of
// the addresses of what they select.
func (r *Renderer) selectorMatch(m *Match, dir, field string) ([]string, []*setDef) {
	var parts []string
	var defs []*setDef
	for _, s := range []struct {
		pp  *PodPeer
		neg string
		f   string
	}{{m.Selector, "", ".selector"}, {m.NotSelector, "! ", ".notSelector"}} {
		if s.pp == nil {
			continue
		}
		d := &setDef{name: r.selectorSetName(s.pp), typ: HashNet, peer: s.pp, field: field + s.f}
		defs = append(defs, d)
		parts = append(parts, fmt.Sprintf("-m set %s--match-set %s %s", s.neg, d.name, dir))
	}
	return []string{strings.Join(parts, " ")}, defs
}

// portMatch renders one port: its protocol and its match.
func (r *Renderer) portMatch(p *Policy, pt Port, dir string, local bool, field string) (string, *setDef) {
	proto := strings.ToLower(string(pt.Protocol))
	opt := "--dport"
	if dir == "src" {
		opt = "--sport"
	}
	switch {
	case pt.Name != "":
		d := &setDef{typ: HashIPPort, namedPort: pt.Name, proto: pt.Protocol, field: field}
		scope := "egress"
		if local {
			// Named by the pods the policy selects, so policies with
			// the same subject share the set.
			d.selectedBy = p
			scope = "ingress:" + p.subjectID()
		}
		d.name = r.namedPortSetName(scope, pt.Name, pt.Protocol)
		return fmt.Sprintf("-p %s -m set --match-set %s %s,%s", proto, d.name, dir, dir), d
	case pt.Number == 0:
		return "-p " + proto, nil
	case pt.EndPort != 0:
		return fmt.Sprintf("-p %s -m %s %s %d:%d", proto, proto, opt, pt.Number, pt.EndPort), nil
	default:
		return fmt.Sprintf("-p %s -m %s %s %d", proto, proto, opt, pt.Number), nil
	}
}

// portMatches returns one match per port ("" for every port), and the
// sets they use. A named port becomes a hash:ip,port set of the pods that
// declare it: on the local endpoint's side (local) the pods the policy
// selects, on the peer's side every pod (the peer match narrows it).
func (r *Renderer) portMatches(p *Policy, ports []Port, dir string, local bool, field string) ([]string, []*setDef) {
	if ports == nil {
		return []string{""}, nil
	}
	var out []string
	var defs []*setDef
	for i, pt := range ports {
		m, d := r.portMatch(p, pt, dir, local, fmt.Sprintf("%s[%d]", field, i))
		if d != nil {
			defs = append(defs, d)
		}
		out = append(out, m)
	}
	return out, defs
}

// notPortsMatch renders notPorts: numbers and ranges in multiport matches
// (15 ports each; a range counts two), named ports as negated sets. The
// converter gives every notPort the rule's protocol. One line: every
// condition must hold.
func (r *Renderer) notPortsMatch(p *Policy, ports []Port, dir string, local bool, field string) ([]string, []*setDef) {
	if len(ports) == 0 {
		return []string{""}, nil
	}
	proto := strings.ToLower(string(ports[0].Protocol))
	opt := "--dports"
	if dir == "src" {
		opt = "--sports"
	}
	parts := []string{"-p " + proto}
	var defs []*setDef
	var nums []string
	weight := 0
	flushNums := func() {
		if len(nums) > 0 {
			parts = append(parts, fmt.Sprintf("-m multiport ! %s %s", opt, strings.Join(nums, ",")))
			nums, weight = nil, 0
		}
	}
	for i, pt := range ports {
		switch {
		case pt.Name != "":
			m, d := r.portMatch(p, pt, dir, local, fmt.Sprintf("%s[%d]", field, i))
			defs = append(defs, d)
			parts = append(parts, strings.Replace(strings.TrimPrefix(m, "-p "+proto+" "), "--match-set", "! --match-set", 1))
		case pt.Number == 0:
			return nil, nil // not any port: nothing is left
		default:
			n, w := strconv.Itoa(int(pt.Number)), 1
			if pt.EndPort != 0 {
				n, w = fmt.Sprintf("%d:%d", pt.Number, pt.EndPort), 2
			}
			if weight+w > 15 {
				flushNums()
			}
			nums, weight = append(nums, n), weight+w
		}
	}
	flushNums()
	return []string{strings.Join(parts, " ")}, defs
}

// subjectID identifies whom a policy selects, to name the sets scoped to
// its pods.
func (p *Policy) subjectID() string {
	id := p.Namespace + ";" + selectorID(p.PodSelector)
	if p.Namespace == "" {
		id = "global;"
		if p.NamespaceSelector != nil {
			id += selectorID(p.NamespaceSelector)
		}
		id += ";" + selectorID(p.PodSelector)
	}
	if sa := p.ServiceAccounts; sa != nil {
		id += ";sa=" + strings.Join(sa.Names, ",")
		if sa.Selector != nil {
			id += ";" + selectorID(sa.Selector)
		}
	}
	return id
}
