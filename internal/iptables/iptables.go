package iptables

import (
	"bytes"
	"fmt"
	"os/exec"
	"strconv"
	"strings"

	goipt "github.com/coreos/go-iptables/iptables"

	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/metrics"
)

// Runner is the rule writer the loops are given.
var _ contract.HookWriter = (*Runner)(nil)

// Family is an IP family.
type Family int

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// Families is where a configuration's "IPv4" and "IPv6" switches become
// families, in the order (IPv4 first) in which the loops keep every
// per-family slice.
func Families(ipv4, ipv6 bool) []Family {
	var out []Family
	if ipv4 {
		out = append(out, IPv4)
	}
	if ipv6 {
		out = append(out, IPv6)
	}
	return out
}

// Is6 reports whether the family is IPv6.
func (f Family) Is6() bool { return f == IPv6 }

// String returns "ipv4" or "ipv6", as logs and metric labels name a
// family.
func (f Family) String() string {
	if f.Is6() {
		return "ipv6"
	}
	return "ipv4"
}

// Mode is the iptables backend.
type Mode string

const (
	ModeNFT    Mode = "nft"
	ModeLegacy Mode = "legacy"
)

// Runner runs one family's iptables commands in one backend.
type Runner struct {
	family  Family
	mode    Mode
	ipt     *goipt.IPTables
	restore string
	save    string
}

func binary(family Family, mode Mode, suffix string) string {
	base := "iptables"
	if family == IPv6 {
		base = "ip6tables"
	}
	return base + "-" + string(mode) + suffix
}

// New returns a runner for a family and backend.
func New(family Family, mode Mode) (*Runner, error) {
	path, err := exec.LookPath(binary(family, mode, ""))
	if err != nil {
		return nil, fmt.Errorf("iptables %s backend not installed: %w", mode, err)
	}
	proto := goipt.ProtocolIPv4
	if family == IPv6 {
		proto = goipt.ProtocolIPv6
	}
	ipt, err := goipt.New(goipt.IPFamily(proto), goipt.Path(path), goipt.Timeout(5))
	if err != nil {
		return nil, fmt.Errorf("initialising %s: %w", path, err)
	}
	return &Runner{family: family, mode: mode, ipt: ipt, restore: binary(family, mode, "-restore"), save: binary(family, mode, "-save")}, nil
}

// Family returns the runner's family.
func (r *Runner) Family() Family { return r.family }

// Mode returns the runner's backend.
func (r *Runner) Mode() Mode { return r.mode }

// HasRandomFully reports whether MASQUERADE --random-fully is supported.
func (r *Runner) HasRandomFully() bool { return r.ipt.HasRandomFully() }

// Restore applies a payload for one table with --noflush. The payload must
// declare every chain it writes (":CHAIN - [0:0]"), which flushes just
// those chains. On failure the error quotes the lines around the rule that
// iptables-restore rejected.
func (r *Runner) Restore(table string, body []byte) error {
	var payload bytes.Buffer
	fmt.Fprintf(&payload, "*%s\n", table)
	payload.Write(body)
	payload.WriteString("COMMIT\n")
	cmd := exec.Command(r.restore, "--noflush", "--wait=5")
	cmd.Stdin = bytes.NewReader(payload.Bytes())
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		metrics.IPTablesRestoreFailures.Inc()
		return fmt.Errorf("%s of table %s: %w: %s%s", r.restore, table, err, strings.TrimSpace(out.String()), failingLines(out.String(), payload.Bytes()))
	}
	return nil
}

// failingLines finds "line N failed" in iptables-restore's output and
// returns the payload lines around it.
func failingLines(msg string, payload []byte) string {
	i := strings.Index(msg, "line ")
	if i < 0 {
		return ""
	}
	f := strings.Fields(msg[i+len("line "):])
	if len(f) == 0 {
		return ""
	}
	n, err := strconv.Atoi(strings.TrimRight(f[0], ":"))
	if err != nil {
		return ""
	}
	lines := strings.Split(string(payload), "\n")
	var b strings.Builder
	b.WriteString("\npayload around the failing line:")
	for l := max(1, n-2); l <= min(len(lines), n+2); l++ {
		mark := "  "
		if l == n {
			mark = "> "
		}
		fmt.Fprintf(&b, "\n%s%d: %s", mark, l, lines[l-1])
	}
	return b.String()
}

// EnsureJump makes sure a built-in chain jumps to one of Sluice's chains,
// first in the chain. It checks first, so an existing jump is left alone.
func (r *Runner) EnsureJump(table, from, to, comment string) error {
	return r.ensureJump(table, from, to, comment, true)
}

// EnsureAppendedJump makes sure a built-in chain jumps to one of Sluice's
// chains, appending the jump when it is missing. An existing jump is left
// where it is, so rules that others append later never start a fight over
// the last place.
func (r *Runner) EnsureAppendedJump(table, from, to, comment string) error {
	return r.ensureJump(table, from, to, comment, false)
}

func (r *Runner) ensureJump(table, from, to, comment string, first bool) error {
	if err := r.EnsureChain(table, to); err != nil {
		return err
	}
	spec := []string{"-m", "comment", "--comment", comment, "-j", to}
	ok, err := r.ipt.Exists(table, from, spec...)
	if err != nil {
		return fmt.Errorf("checking jump %s -> %s in %s: %w", from, to, table, err)
	}
	if ok {
		return nil
	}
	if first {
		err = r.ipt.Insert(table, from, 1, spec...)
	} else {
		err = r.ipt.Append(table, from, spec...)
	}
	if err != nil {
		return fmt.Errorf("adding jump %s -> %s in %s: %w", from, to, table, err)
	}
	return nil
}

// DeleteJump removes a jump made by EnsureJump, if present.
func (r *Runner) DeleteJump(table, from, to, comment string) error {
	return r.ipt.DeleteIfExists(table, from, "-m", "comment", "--comment", comment, "-j", to)
}

// EnsureChain creates a chain if it is missing.
func (r *Runner) EnsureChain(table, chain string) error {
	ok, err := r.ipt.ChainExists(table, chain)
	if err != nil {
		return fmt.Errorf("checking chain %s/%s: %w", table, chain, err)
	}
	if ok {
		return nil
	}
	if err := r.ipt.NewChain(table, chain); err != nil {
		return fmt.Errorf("creating chain %s/%s: %w", table, chain, err)
	}
	return nil
}

// DeleteChain flushes and deletes a chain if it exists.
func (r *Runner) DeleteChain(table, chain string) error {
	ok, err := r.ipt.ChainExists(table, chain)
	if err != nil || !ok {
		return err
	}
	return r.ipt.ClearAndDeleteChain(table, chain)
}

// Rules lists a chain's rules as iptables -S prints them, without the
// chain declaration.
func (r *Runner) Rules(table, chain string) ([]string, error) {
	rules, err := r.ipt.List(table, chain)
	if err != nil {
		return nil, err
	}
	if len(rules) > 0 && strings.HasPrefix(rules[0], "-N ") || len(rules) > 0 && strings.HasPrefix(rules[0], "-P ") {
		rules = rules[1:]
	}
	return rules, nil
}

// Save returns every table of the family in this backend as iptables-save
// prints it. Without -t, iptables-save lists only tables that exist, so
// reading never creates one.
func (r *Runner) Save() (string, error) {
	out, err := exec.Command(r.save).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		return "", fmt.Errorf("%s: %w: %s", r.save, err, strings.TrimSpace(string(stderr)))
	}
	return string(out), nil
}

// SaveTable returns one table as iptables-save prints it, with the packet
// and byte counters when counters is set.
func (r *Runner) SaveTable(table string, counters bool) (string, error) {
	args := []string{"-t", table}
	if counters {
		args = append(args, "-c")
	}
	out, err := exec.Command(r.save, args...).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		return "", fmt.Errorf("%s -t %s: %w: %s", r.save, table, err, strings.TrimSpace(string(stderr)))
	}
	return string(out), nil
}

// Chains that say which backend Kubernetes' node components use:
// kube-proxy's canary (iptables mode only; in nftables mode kube-proxy
// writes no iptables rules) and the kubelet's hint and canary, which
// kube-proxy's own iptables wrapper looks for.
const (
	kubeProxyCanary = "KUBE-PROXY-CANARY"
	kubeletHint     = "KUBE-IPTABLES-HINT"
	kubeletCanary   = "KUBE-KUBELET-CANARY"
)

// BackendEvidence is what one backend's iptables-save shows.
type BackendEvidence struct {
	// Rules counts the "-A" lines.
	Rules int
	// KubeProxy is set when kube-proxy's canary chain is there.
	KubeProxy bool
	// Kubelet is set when the kubelet's hint or canary chain is there.
	Kubelet bool
}

// Evidence reads a backend's iptables-save output.
func Evidence(save string) BackendEvidence {
	var e BackendEvidence
	for _, l := range strings.Split(save, "\n") {
		switch {
		case strings.HasPrefix(l, "-A "):
			e.Rules++
		case strings.HasPrefix(l, ":"+kubeProxyCanary+" "):
			e.KubeProxy = true
		case strings.HasPrefix(l, ":"+kubeletHint+" "), strings.HasPrefix(l, ":"+kubeletCanary+" "):
			e.Kubelet = true
		}
	}
	return e
}

// Detection is the backend chosen and why.
type Detection struct {
	Mode   Mode
	Reason string
}

// Choose picks the backend the node's Kubernetes components use, as
// kube-proxy's iptables wrapper does, with kube-proxy's own chains first:
// Sluice's rules must sit in the same tables as kube-proxy's, or their
// order and marks mean nothing to each other.
//  1. the backend where kube-proxy (iptables mode) made its canary;
//  2. else the one where the kubelet made its hint or canary (nft if both);
//  3. else the one with more rules;
//  4. else nft.
func Choose(nft, legacy BackendEvidence) Detection {
	switch {
	case nft.KubeProxy && !legacy.KubeProxy:
		return Detection{ModeNFT, "kube-proxy's chains are in iptables-nft"}
	case legacy.KubeProxy && !nft.KubeProxy:
		return Detection{ModeLegacy, "kube-proxy's chains are in iptables-legacy"}
	case nft.Kubelet:
		return Detection{ModeNFT, "the kubelet's " + kubeletHint + " is in iptables-nft"}
	case legacy.Kubelet:
		return Detection{ModeLegacy, "the kubelet's " + kubeletHint + " is in iptables-legacy"}
	case legacy.Rules > nft.Rules:
		return Detection{ModeLegacy, fmt.Sprintf("no Kubernetes chains; iptables-legacy has more rules (%d against %d)", legacy.Rules, nft.Rules)}
	default:
		return Detection{ModeNFT, "no Kubernetes chains; nft is the default"}
	}
}

// readEvidence reads one backend's IPv4 tables; a backend whose tools fail
// shows nothing.
func readEvidence(m Mode) BackendEvidence {
	out, err := exec.Command(binary(IPv4, m, "-save")).Output()
	if err != nil {
		return BackendEvidence{}
	}
	return Evidence(string(out))
}

// Detect picks the backend the node already uses (see Choose).
func Detect() Detection { return Choose(readEvidence(ModeNFT), readEvidence(ModeLegacy)) }

// DetectMode is Detect's backend.
func DetectMode() Mode { return Detect().Mode }

// KubeMode returns the backend in which kube-proxy or the kubelet made
// their chains, if they did.
func KubeMode() (Mode, bool) {
	nft, legacy := readEvidence(ModeNFT), readEvidence(ModeLegacy)
	if !nft.KubeProxy && !legacy.KubeProxy && !nft.Kubelet && !legacy.Kubelet {
		return "", false
	}
	return Choose(nft, legacy).Mode, true
}

// CheckMode refuses a backend other than the one kube-proxy and the kubelet
// use: rules split over two backends are evaluated in an order nobody
// chose, and one program's accept can skip the other's policy.
func CheckMode(m Mode) error {
	if km, ok := KubeMode(); ok && km != m {
		return fmt.Errorf("kube-proxy and the kubelet use iptables-%s, and Sluice was told to use iptables-%s: refusing to mix them; use --iptables-mode=auto or %s", km, m, km)
	}
	return nil
}

// Raw runs the iptables command with arguments, for tests and diagnostics.
func (r *Runner) Raw(args ...string) error {
	out, err := exec.Command(binary(r.family, r.mode, ""), append([]string{"--wait=5"}, args...)...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", binary(r.family, r.mode, ""), strings.Join(args, " "), err, out)
	}
	return nil
}
