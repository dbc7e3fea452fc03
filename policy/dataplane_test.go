package policy

import (
	"fmt"
	"io"
	"log"
	"math/rand"
	"os/exec"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"

	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/forward"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

func init() { log.SetOutput(io.Discard) } // vishvananda/netlink's ipset notes

// forwardingWriter is an IPv4 nft writer for the current namespace, with
// the forwarding chain in place, as sluiced has it before the first Apply.
func forwardingWriter() (*iptables.Runner, error) {
	r, err := iptables.New(iptables.IPv4, iptables.ModeNFT)
	if err != nil {
		return nil, err
	}
	return r, forward.Apply(r)
}

func save(t *testing.T, ns string) string {
	out, err := exec.Command("ip", "netns", "exec", ns, "iptables-nft-save", "-t", "filter").CombinedOutput()
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

func TestDataplaneWritesOnlyChanges(t *testing.T) {
	n := nettest.NewNS(t)
	w := newWorld()
	deny := np("x", "deny", networkingv1.NetworkPolicySpec{})
	allow := np("x", "allow-y", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"), Ingress: []networkingv1.NetworkPolicyIngressRule{{
		From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "y")}, {IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/8", Except: []string{"10.244.5.0/24"}}}},
		// SCTP is rendered and loaded even though this kernel cannot carry
		// SCTP traffic.
		Ports: []networkingv1.NetworkPolicyPort{port(80, corev1.ProtocolTCP), namedPort("serve-81-udp", corev1.ProtocolUDP), port(9, corev1.ProtocolSCTP)}}}})
	nettest.Do(t, n, func() error {
		r, err := forwardingWriter()
		if err != nil {
			return err
		}
		d := NewDataplane(r, false)
		st, err := d.Apply(w.render([]*Policy{deny, allow}))
		if err != nil {
			return err
		}
		if st.ChainsWritten == 0 || st.SetsChanged != 3 {
			t.Errorf("first apply: %+v", st)
		}
		if !strings.Contains(save(t, nettest.Name(n)), "-p sctp -m set") || !strings.Contains(save(t, nettest.Name(n)), "-m sctp --dport 9") {
			t.Error("the SCTP rule is not in the kernel")
		}
		// Nothing changed: nothing written.
		if st, err := d.Apply(w.render([]*Policy{deny, allow})); err != nil || st.Changed() {
			t.Errorf("second apply: %+v %v", st, err)
		}
		// A restarted agent reads the kernel and finds nothing to change:
		// the rendered rules are in iptables-save's canonical form.
		d2 := NewDataplane(r, false)
		if st, err := d2.Apply(w.render([]*Policy{deny, allow})); err != nil || st.ChainsWritten != 0 {
			t.Errorf("apply after restart rewrote %d chains (%v); rendered text differs from iptables-save", st.ChainsWritten, err)
		}
		// One policy removed: only its chains and what referenced them.
		st, err = d.Apply(w.render([]*Policy{deny}))
		if err != nil {
			return err
		}
		if st.ChainsDeleted != 1 || st.SetsDeleted != 3 {
			t.Errorf("removing a policy: %+v", st)
		}
		if st.ChainsWritten > 2 {
			t.Errorf("removing a policy rewrote %d chains, want only x/a's ingress chain", st.ChainsWritten)
		}
		if strings.Contains(save(t, nettest.Name(n)), PolicyChain("x/allow-y", false)) {
			t.Error("the removed policy's chain remains")
		}
		// A rule deleted behind our back comes back after a re-read.
		if err := r.Raw("-F", contract.FromPodChain); err != nil {
			return err
		}
		if err := d.ReadKernel(); err != nil {
			return err
		}
		if st, err := d.Apply(w.render([]*Policy{deny})); err != nil || st.ChainsWritten != 1 {
			t.Errorf("repair after a flush: %+v %v", st, err)
		}
		// Everything goes.
		if err := forward.Remove(r); err != nil {
			return err
		}
		if err := d.Remove(); err != nil {
			return err
		}
		if left := save(t, nettest.Name(n)); strings.Contains(left, "SLUICE") {
			t.Errorf("left after Remove:\n%s", left)
		}
		return nil
	})
	if out, _ := exec.Command("ip", "netns", "exec", nettest.Name(n), "ipset", "list", "-n").CombinedOutput(); strings.TrimSpace(string(out)) != "" {
		t.Errorf("sets left: %s", out)
	}
}

// TestChainsEditedInPlace changes one chain at random many times and reads
// it back from the kernel after each change, for both backends: the
// positional edits must leave exactly the wanted rules.
func TestChainsEditedInPlace(t *testing.T) {
	for _, mode := range []iptables.Mode{iptables.ModeNFT, iptables.ModeLegacy} {
		t.Run(string(mode), func(t *testing.T) {
			n := nettest.NewNS(t)
			rnd := rand.New(rand.NewSource(1))
			const chain = "SLUICE-TW-0123456789a"
			nettest.Do(t, n, func() error {
				r, err := iptables.New(iptables.IPv4, mode)
				if err != nil {
					return err
				}
				d := NewDataplane(r, false)
				edited := 0
				for step := 0; step < 40; step++ {
					var want []string
					for i := rnd.Intn(12); i > 0; i-- {
						want = append(want, fmt.Sprintf("-A %s -s 10.0.0.%d/32 -j RETURN", chain, rnd.Intn(6)))
					}
					st, err := d.Apply(&Ruleset{Chains: map[string][]string{chain: want}, Sets: map[string]*Set{}})
					if err != nil {
						return fmt.Errorf("step %d: %w", step, err)
					}
					if st.ChainsWritten == 1 && st.Payload < 40*len(want) {
						edited++
					}
					out, err := exec.Command("iptables-"+string(mode)+"-save", "-t", "filter").Output()
					if err != nil {
						return err
					}
					var got []string
					for _, l := range strings.Split(string(out), "\n") {
						if strings.HasPrefix(l, "-A "+chain+" ") {
							got = append(got, l)
						}
					}
					if !slices.Equal(got, want) {
						t.Fatalf("step %d: kernel has\n%s\nwant\n%s", step, strings.Join(got, "\n"), strings.Join(want, "\n"))
					}
				}
				if edited == 0 {
					t.Error("no change was made in place")
				}
				return d.Remove()
			})
		})
	}
}
