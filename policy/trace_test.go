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
}

type packet struct {
	in, out  string // interfaces; "" when not a pod veth
	src, dst netip.Addr
	proto    Protocol
	dport    int32
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

func (tr *tracer) matches(f []string, p *packet) bool {
	for i := 0; i < len(f); i++ {
		switch f[i] {
		case "-j", "-g":
			return true
		case "-i", "-o":
			iface := p.in
			if f[i] == "-o" {
				iface = p.out
			}
			pat := f[i+1]
			i++
			if strings.HasSuffix(pat, "+") {
				if !strings.HasPrefix(iface, strings.TrimSuffix(pat, "+")) {
					return false
				}
			} else if iface != pat {
				return false
			}
		case "-s", "-d":
			ip := p.src
			if f[i] == "-d" {
				ip = p.dst
			}
			if !netip.MustParsePrefix(f[i+1]).Contains(ip) {
				return false
			}
			i++
		case "-p":
			if !strings.EqualFold(f[i+1], string(p.proto)) {
				return false
			}
			i++
		case "-m":
			i++ // module name; its options follow
		case "--dport":
			lo, hi, ok := strings.Cut(f[i+1], ":")
			l, _ := strconv.Atoi(lo)
			h := l
			if ok {
				h, _ = strconv.Atoi(hi)
			}
			if int(p.dport) < l || int(p.dport) > h {
				return false
			}
			i++
		case "--ctstate":
			if !slices.Contains(strings.Split(f[i+1], ","), p.ctState()) {
				return false
			}
			i++
		case "--mark":
			v, m := parseMark(tr.t, f[i+1])
			if tr.mark&m != v {
				return false
			}
			i++
		case "--match-set":
			if !tr.inSet(f[i+1], f[i+2], p) {
				return false
			}
			i += 2
		case "--comment":
			// Skip the quoted comment.
			for i+1 < len(f) && !strings.HasSuffix(f[i+1], `"`) {
				i++
			}
			i++
		default:
			tr.t.Fatalf("tracer does not understand %q in %v", f[i], f)
		}
	}
	return true
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
		want := fmt.Sprintf("%s,%s:%d", ip, strings.ToLower(string(p.proto)), p.dport)
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
