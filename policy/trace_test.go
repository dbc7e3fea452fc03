package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// tracer walks a virtual packet through a rendered ruleset, like kube-proxy's
// tracePacket: it understands exactly the matches and targets the renderer
// emits, and fails the test on anything else or on a jump to a chain that
// does not exist, as the kernel would refuse it.
type tracer struct {
	t    *testing.T
	rs   *Ruleset
	mark uint32
	// steps counts the rules the packet was matched against.
	steps int
	// logs are the NFLOG prefixes the packet was logged with, in order;
	// drops the drop logs' (droplog.go).
	logs, drops []string
}

type packet struct {
	in, out  string // interfaces; "" when not a pod veth
	src, dst netip.Addr
	proto    Protocol
	dport    int32
	sport    int32
	// icmpType and icmpCode are an ICMP or ICMPv6 message's.
	icmpType, icmpCode int32
	// state is the packet's conntrack state: NEW (the first packet of a
	// connection) when empty, else ESTABLISHED, RELATED or INVALID.
	state string
}

// ctState is the packet's conntrack state.
func (p *packet) ctState() string {
	if p.state == "" {
		return "NEW"
	}
	return p.state
}

const (
	verdictReturn = "RETURN"
	verdictDrop   = "DROP"
	verdictAccept = "ACCEPT"
)

// run evaluates a chain; it returns the verdict that ends the walk, or
// RETURN when the chain falls through.
func (tr *tracer) run(chain string, p *packet, depth int) string {
	if depth > 20 {
		tr.t.Fatalf("rule loop at %s", chain)
	}
	rules, ok := tr.rs.Chains[chain]
	if !ok {
		tr.t.Fatalf("jump to missing chain %s", chain)
	}
	for _, rule := range rules {
		f := strings.Fields(rule)
		if f[0] != "-A" || f[1] != chain {
			tr.t.Fatalf("rule %q is not in chain %s", rule, chain)
		}
		tr.steps++
		if !tr.matches(f[2:], p) {
			continue
		}
		target, arg := targetOf(f)
		switch target {
		case "-j":
			switch arg {
			case verdictReturn:
				return verdictReturn
			case verdictDrop, verdictAccept:
				return arg
			case "MARK":
				tr.setMark(f)
			case "NFLOG":
				if _, ok := ParseDropPrefix(nflogPrefix(f)); ok {
					tr.drops = append(tr.drops, nflogPrefix(f))
				} else {
					tr.logs = append(tr.logs, nflogPrefix(f))
				}
			default:
				if v := tr.run(arg, p, depth+1); v != verdictReturn {
					return v
				}
			}
		case "-g":
			return tr.run(arg, p, depth+1)
		}
	}
	return verdictReturn
}

func targetOf(f []string) (string, string) {
	for i := len(f) - 2; i >= 0; i-- {
		if f[i] == "-j" || f[i] == "-g" {
			return f[i], f[i+1]
		}
	}
	return "", ""
}

func (tr *tracer) setMark(f []string) {
	for i := range f {
		if f[i] == "--set-xmark" {
			v, m := parseMark(tr.t, f[i+1])
			tr.mark = (tr.mark &^ m) | v
		}
	}
}

func parseMark(t *testing.T, s string) (uint32, uint32) {
	vs, ms, _ := strings.Cut(s, "/")
	v, err1 := strconv.ParseUint(vs, 0, 32)
	m, err2 := strconv.ParseUint(ms, 0, 32)
	if err1 != nil || err2 != nil {
		t.Fatalf("bad mark %q", s)
	}
	return uint32(v), uint32(m)
}

// nflogPrefix returns an NFLOG rule's prefix, unquoted.
func nflogPrefix(f []string) string {
	for i := range f {
		if f[i] == "--nflog-prefix" && i+1 < len(f) {
			return strings.Trim(f[i+1], `"`)
		}
	}
	return ""
}

// tracerProto is a protocol as iptables names it, written out here rather
// than taken from the renderer.
func tracerProto(p Protocol) string {
	switch p {
	case ICMPv6:
		return "ipv6-icmp"
	}
	return strings.ToLower(string(p))
}

// inPorts reports whether port is in an iptables port list ("80",
// "80:90", "80,8000:8080").
func inPorts(list string, port int32) bool {
	for _, item := range strings.Split(list, ",") {
		lo, hi, ok := strings.Cut(item, ":")
		l, _ := strconv.Atoi(lo)
		h := l
		if ok {
			h, _ = strconv.Atoi(hi)
		}
		if int(port) >= l && int(port) <= h {
			return true
		}
	}
	return false
}

// icmpTypeMatches reports whether a packet is of an ICMP "type[/code]".
func icmpTypeMatches(p *packet, spec string, v6 bool) bool {
	if v6 != (p.proto == ICMPv6) || (!v6 && p.proto != ICMP) {
		return false
	}
	ts, cs, hasCode := strings.Cut(spec, "/")
	typ, _ := strconv.Atoi(ts)
	if int32(typ) != p.icmpType {
		return false
	}
	if hasCode {
		code, _ := strconv.Atoi(cs)
		return int32(code) == p.icmpCode
	}
	return true
}

func (tr *tracer) matches(f []string, p *packet) bool {
	neg := false
	for i := 0; i < len(f); i++ {
		if f[i] == "!" {
			neg = true
			continue
		}
		ok, n := tr.matchOne(f, i, p)
		if ok == neg {
			return false
		}
		neg = false
		i = n
		if f[i] == "-j" || f[i] == "-g" {
			return true
		}
	}
	return true
}

// matchOne evaluates the match at f[i]; it returns whether it holds and
// the index of its last word.
func (tr *tracer) matchOne(f []string, i int, p *packet) (bool, int) {
	switch f[i] {
	case "-j", "-g":
		return true, i
	case "-p":
		return strings.EqualFold(f[i+1], tracerProto(p.proto)), i + 1
	case "-s", "-d":
		ip := p.src
		if f[i] == "-d" {
			ip = p.dst
		}
		return netip.MustParsePrefix(f[i+1]).Contains(ip), i + 1
	case "--sport":
		return inPorts(f[i+1], p.sport), i + 1
	case "--dports":
		return inPorts(f[i+1], p.dport), i + 1
	case "--sports":
		return inPorts(f[i+1], p.sport), i + 1
	case "--icmp-type":
		return icmpTypeMatches(p, f[i+1], false), i + 1
	case "--icmpv6-type":
		return icmpTypeMatches(p, f[i+1], true), i + 1
	case "-i", "-o":
		iface := p.in
		if f[i] == "-o" {
			iface = p.out
		}
		pat := f[i+1]
		if strings.HasSuffix(pat, "+") {
			return strings.HasPrefix(iface, strings.TrimSuffix(pat, "+")), i + 1
		}
		return iface == pat, i + 1
	case "-m":
		return true, i + 1 // module name; its options follow
	case "--dport":
		return inPorts(f[i+1], p.dport), i + 1
	case "--ctstate":
		return slices.Contains(strings.Split(f[i+1], ","), p.ctState()), i + 1
	case "--hashlimit-upto", "--hashlimit-burst", "--hashlimit-mode", "--hashlimit-name":
		return true, i + 1 // the drop log's rate limit: every packet traced is under it
	case "--mark":
		v, m := parseMark(tr.t, f[i+1])
		return tr.mark&m == v, i + 1
	case "--match-set":
		return tr.inSet(f[i+1], f[i+2], p), i + 2
	case "--comment":
		// Skip the quoted comment.
		for i+1 < len(f) && !strings.HasSuffix(f[i+1], `"`) {
			i++
		}
		return true, i + 1
	}
	tr.t.Fatalf("tracer does not understand %q in %v", f[i], f)
	return false, i
}

func (tr *tracer) inSet(name, dir string, p *packet) bool {
	set, ok := tr.rs.Sets[name]
	if !ok {
		tr.t.Fatalf("reference to missing set %s", name)
	}
	ip := p.src
	if strings.HasPrefix(dir, "dst") {
		ip = p.dst
	}
	switch set.Type {
	case HashNet:
		// hash:net picks the most specific entry; nomatch entries exclude.
		best, bestNomatch := -1, false
		for _, e := range set.Entries {
			cidr, nomatch := strings.CutSuffix(e, " nomatch")
			pfx := netip.MustParsePrefix(cidr)
			if pfx.Contains(ip) && pfx.Bits() > best {
				best, bestNomatch = pfx.Bits(), nomatch
			}
		}
		return best >= 0 && !bestNomatch
	case HashIPPort:
		port := p.dport
		if strings.HasPrefix(dir, "src") {
			port = p.sport
		}
		want := fmt.Sprintf("%s,%s:%d", ip, strings.ToLower(string(p.proto)), port)
		for _, e := range set.Entries {
			if e == want {
				return true
			}
		}
		return false
	}
	tr.t.Fatalf("unknown set type %s", set.Type)
	return false
}
