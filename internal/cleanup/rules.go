package cleanup

import (
	"fmt"
	"sort"
	"strings"
)

// ChainPrefix starts every chain Sluice makes (policy, forwarding and
// masquerade alike).
const ChainPrefix = "SLUICE-"

// removal reads iptables-save output and returns, per table, the
// iptables-restore --noflush payload that removes Sluice's chains and the
// jumps to them, in one transaction per table: flush our chains (a chain
// line flushes it), delete other chains' rules that jump to ours, then
// delete our chains, which nothing references any more. Tables without
// anything of ours get no payload.
func removal(save string) map[string][]byte {
	out := map[string][]byte{}
	var table string
	var chains, jumps []string
	flush := func() {
		if table != "" && len(chains)+len(jumps) > 0 {
			sort.Strings(chains)
			var b strings.Builder
			for _, c := range chains {
				fmt.Fprintf(&b, ":%s - [0:0]\n", c)
			}
			for _, j := range jumps {
				b.WriteString(j + "\n")
			}
			for _, c := range chains {
				fmt.Fprintf(&b, "-X %s\n", c)
			}
			out[table] = []byte(b.String())
		}
		table, chains, jumps = "", nil, nil
	}
	for _, l := range strings.Split(save, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			flush()
			table = strings.TrimSpace(l[1:])
		case l == "COMMIT":
			flush()
		case strings.HasPrefix(l, ":"):
			if f := strings.Fields(l[1:]); len(f) > 0 && strings.HasPrefix(f[0], ChainPrefix) {
				chains = append(chains, f[0])
			}
		case strings.HasPrefix(l, "-A "):
			args := splitRule(l)
			if len(args) < 2 || strings.HasPrefix(args[1], ChainPrefix) {
				continue // our own chains' rules go with the chains
			}
			if jumpsToOurs(args) {
				// The rule exactly as saved, so restore finds the same one.
				jumps = append(jumps, "-D"+strings.TrimPrefix(l, "-A"))
			}
		}
	}
	flush()
	return out
}

// jumpsToOurs reports whether a rule's target is one of Sluice's chains.
func jumpsToOurs(args []string) bool {
	for i := 0; i+1 < len(args); i++ {
		switch args[i] {
		case "-j", "-g", "--jump", "--goto":
			if strings.HasPrefix(args[i+1], ChainPrefix) {
				return true
			}
		}
	}
	return false
}

// splitRule splits a saved rule into arguments as iptables-restore does:
// double quotes group (comments), a backslash escapes the next character.
// So a comment that merely mentions "-j SLUICE-X" is one argument, not a
// jump.
func splitRule(l string) []string {
	var args []string
	var cur strings.Builder
	inQuote, escaped, have := false, false, false
	for _, r := range l {
		switch {
		case escaped:
			cur.WriteRune(r)
			escaped, have = false, true
		case r == '\\':
			escaped = true
		case r == '"':
			inQuote, have = !inQuote, true
		case r == ' ' && !inQuote:
			if have {
				args = append(args, cur.String())
				cur.Reset()
				have = false
			}
		default:
			cur.WriteRune(r)
			have = true
		}
	}
	if have {
		args = append(args, cur.String())
	}
	return args
}
