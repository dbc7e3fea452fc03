package contract

import (
	"context"
	"fmt"
	"strings"

	"github.com/sluice-net/sluice/cni/endpointapi"
)

// HostVethPrefix starts the name of every host-side pod interface the CNI
// plugin makes. The policy loop and the forwarding decision match pod
// traffic by it ("-i sl+"), so nothing else Sluice makes may start with it.
const HostVethPrefix = "sl"

// The filter chains that hold the pod forwarding decision. Package forward
// makes them and jumps to them; the policy loop owns what is in them.
const (
	FromPodChain = "SLUICE-FROM-POD" // egress policy of the sending pod
	ToPodChain   = "SLUICE-TO-POD"   // ingress policy of the receiving pod
	// ToHostChain holds the policy of traffic from a pod to its own node
	// (filter INPUT), which only ClusterNetworkPolicy governs.
	ToHostChain = "SLUICE-TO-HOST"
)

// CheckTunnelDevice refuses a tunnel device name (VXLAN, WireGuard, ...)
// that starts with HostVethPrefix: the policy loop would take the tunnel's
// traffic for a pod's, and drop it as coming from an unprogrammed pod.
func CheckTunnelDevice(name string) error {
	if strings.HasPrefix(name, HostVethPrefix) {
		return fmt.Errorf("tunnel device %q starts with the pod veth prefix %q, which the policy loop matches as a pod", name, HostVethPrefix)
	}
	return nil
}

// MustTunnelPrefix returns prefix, for a package-level variable from which
// tunnel device names are made, and panics when CheckTunnelDevice refuses
// it. A name made of a fixed prefix and a number is wrong for every node
// or for none: failing at the program's (and every test's) start is the
// place to learn it, not an error that each caller would have to handle.
// A name that comes from configuration goes through CheckTunnelDevice.
func MustTunnelPrefix(prefix string) string {
	if err := CheckTunnelDevice(prefix); err != nil {
		panic(err)
	}
	return prefix
}

// EndpointProgrammer programs a pod endpoint's dataplane: the policy loop,
// called by the endpoint registry on the CNI plugin's behalf.
type EndpointProgrammer interface {
	// ProgramEndpoint returns once the endpoint's rules are in the kernel,
	// so the pod's first packet meets its policy.
	ProgramEndpoint(ctx context.Context, ep endpointapi.Endpoint) error
	// RemoveEndpoint forgets an endpoint; its rules go with the next sync.
	RemoveEndpoint(ctx context.Context, ep endpointapi.Endpoint) error
}

// RuleWriter reads and writes one IP family's iptables rules the way the
// loops render them: whole tables read, whole chains written in one
// transaction. *iptables.Runner implements it; a test can put a fake in
// its place.
type RuleWriter interface {
	// SaveTable returns a table as iptables-save prints it, with packet
	// and byte counters when counters is set.
	SaveTable(table string, counters bool) (string, error)
	// Restore applies a payload to a table with --noflush, in one
	// transaction: the kernel takes all of it or none.
	Restore(table string, payload []byte) error
}

// HookWriter is a RuleWriter that also keeps the few jumps from built-in
// chains into Sluice's own, which are checked and inserted one by one so
// the rules of other programs in those chains are never rewritten.
type HookWriter interface {
	RuleWriter
	// EnsureChain creates a chain if it is missing.
	EnsureChain(table, chain string) error
	// Rules lists a chain's rules as iptables -S prints them.
	Rules(table, chain string) ([]string, error)
	// EnsureJump makes sure from jumps to to, first in the chain.
	EnsureJump(table, from, to, comment string) error
	// EnsureAppendedJump makes sure from jumps to to, appending the jump
	// when it is missing and leaving an existing one where it is.
	EnsureAppendedJump(table, from, to, comment string) error
	// DeleteJump removes a jump made by EnsureJump, if present.
	DeleteJump(table, from, to, comment string) error
}
