package policy

// Drop logging: each rule that drops for policy (a Deny rule in a policy
// chain, the end-of-tier drop in an endpoint chain) is preceded, when the
// Renderer's DropLog is set, by the same match sending the packet to
// NFLOG, for the first packet of a connection only (ctstate NEW: later
// packets of a denied connection never get that far, being NEW again
// only when the sender retries), and at most DropLogRate a second per
// local endpoint: one hashlimit table per direction keyed by the local
// endpoint's address (the source for egress, the destination for
// ingress), so a flood at one pod costs a few log records a second and
// never silences the drops of another.
//
// The prefix says what decided, in fields the agent parses (DropReason):
//
//	sluice|D|I|<policy hash>|<rule>   a Deny rule of a policy
//	sluice|T|E|<veth suffix>|<tier>   the end of a tier, for an endpoint

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/sluice-net/sluice/internal/contract"
)

const (
	// DropLogGroup is the NFLOG group of drop logs; Log rules use
	// DefaultLogGroup.
	DropLogGroup = 21
	// DropLogRate and DropLogBurst bound the drop logs of one local
	// endpoint and direction, per second.
	DropLogRate  = 10
	DropLogBurst = 20
	// nflogPrefixMax is NFLOG's prefix size without its NUL.
	nflogPrefixMax = 63
)

// dropLogTarget is the matches and target that log a dropped packet, to
// follow a rule's own matches.
func (r *Renderer) dropLogTarget(egress bool, prefix string) string {
	mode, name := "dstip", "sluiceDropI"
	if egress {
		mode, name = "srcip", "sluiceDropE"
	}
	return fmt.Sprintf("-m conntrack --ctstate NEW -m hashlimit --hashlimit-upto %d/sec --hashlimit-burst %d --hashlimit-mode %s --hashlimit-name %s -j NFLOG --nflog-prefix \"%s\" --nflog-group %d",
		DropLogRate, DropLogBurst, mode, name, prefix, DropLogGroup)
}

func dirLetter(egress bool) string {
	if egress {
		return "E"
	}
	return "I"
}

// DropPrefixRule is the drop log prefix of a policy's Deny rule.
func DropPrefixRule(key string, egress bool, rule int) string {
	return fmt.Sprintf("sluice|D|%s|%s|%d", dirLetter(egress), shortHash(key), rule)
}

// DropPrefixTier is the drop log prefix of an endpoint's end-of-tier
// drop; a long tier name is cut to fit NFLOG's prefix.
func DropPrefixTier(veth string, egress bool, tier string) string {
	p := fmt.Sprintf("sluice|T|%s|%s|%s", dirLetter(egress), strings.TrimPrefix(veth, contract.HostVethPrefix), tier)
	if len(p) > nflogPrefixMax {
		p = p[:nflogPrefixMax]
	}
	return p
}

// DropReason is a drop log prefix, parsed.
type DropReason struct {
	Egress bool
	// PolicyHash and Rule are set for a Deny rule (the hash that names
	// the policy's chains); VethSuffix and Tier for the end of a tier.
	PolicyHash string
	Rule       int
	VethSuffix string
	Tier       string
}

// ParseDropPrefix parses a drop log prefix; ok is false for any other
// NFLOG prefix.
func ParseDropPrefix(prefix string) (DropReason, bool) {
	if strings.HasPrefix(prefix, "sluice|L|") {
		return DropReason{}, false // a Log rule's: ParseLogPrefix
	}
	return parsePrefix(prefix)
}

// ParseLogPrefix parses the prefix of a policy's Log rule (LogPrefix).
func ParseLogPrefix(prefix string) (DropReason, bool) {
	if !strings.HasPrefix(prefix, "sluice|L|") {
		return DropReason{}, false
	}
	return parsePrefix(prefix)
}

func parsePrefix(prefix string) (DropReason, bool) {
	f := strings.SplitN(strings.TrimRight(prefix, "\x00"), "|", 5)
	if len(f) != 5 || f[0] != "sluice" || (f[2] != "I" && f[2] != "E") {
		return DropReason{}, false
	}
	d := DropReason{Egress: f[2] == "E"}
	switch f[1] {
	case "D", "L":
		n, err := strconv.Atoi(f[4])
		if err != nil {
			return DropReason{}, false
		}
		d.PolicyHash, d.Rule = f[3], n
	case "T":
		d.VethSuffix, d.Tier = f[3], f[4]
	default:
		return DropReason{}, false
	}
	return d, true
}

// PolicyHash is the hash a drop log prefix names a policy by.
func PolicyHash(key string) string { return shortHash(key) }

// chainVeth is the host veth of an endpoint chain (SLUICE-TW-<suffix>).
func chainVeth(chain string) string {
	for _, p := range []string{chainPrefix + "TW-", chainPrefix + "FW-", chainPrefix + "FH-"} {
		if s, ok := strings.CutPrefix(chain, p); ok {
			return contract.HostVethPrefix + s
		}
	}
	return chain
}
