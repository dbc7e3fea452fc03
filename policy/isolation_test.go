package policy

import (
	"errors"
	"strings"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"

	"github.com/sluice-net/sluice/internal/forward"
	"github.com/sluice-net/sluice/internal/ipset"
	"github.com/sluice-net/sluice/internal/nettest"
)

// poisonedWorld is three policies in namespace x: a default deny, an
// ingress allow from an ipBlock (the one a test poisons) and an ingress
// allow from namespace y.
func poisonedWorld() (w *world, deny, fromBlock, fromY *Policy, blockSet string) {
	w = newWorld()
	deny = np("x", "deny", networkingv1.NetworkPolicySpec{})
	fromBlock = np("x", "from-block", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"), Ingress: []networkingv1.NetworkPolicyIngressRule{{
		From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/8"}}}}}})
	fromY = np("x", "from-y", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "b"), Ingress: []networkingv1.NetworkPolicyIngressRule{{
		From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "y")}}}}})
	blockSet = (&Renderer{}).cidrSetName(&fromBlock.IngressRules[0].Src.Peers[0])
	return
}

// poisonSet makes writing one set fail, as a set the kernel refuses would,
// and counts the tries.
func poisonSet(d *Dataplane, name string, fail *bool, tries *int) {
	d.syncSet = func(n, typ string, ipv6 bool, want []ipset.Entry) (int, error) {
		if n == name && *fail {
			*tries++
			return 0, errors.New("poisoned by the test")
		}
		return ipset.Sync(n, typ, ipv6, want)
	}
}

// TestPoisonedSetFailsClosedAlone: a set that cannot be written makes
// only the policy that uses it fail closed; every other chain is written,
// a later unrelated change too, and the fixed object converges at once.
func TestPoisonedSetFailsClosedAlone(t *testing.T) {
	n := nettest.NewNS(t)
	w, deny, fromBlock, fromY, blockSet := poisonedWorld()
	nettest.Do(t, n, func() error {
		r, err := forwardingWriter()
		if err != nil {
			return err
		}
		d := NewDataplane(r, false)
		fail, tries := true, 0
		poisonSet(d, blockSet, &fail, &tries)
		st, err := d.Apply(w.render([]*Policy{deny, fromBlock, fromY}))
		if err != nil {
			t.Fatalf("one poisoned set failed the whole apply: %v", err)
		}
		blockChain := PolicyChain(fromBlock.Key, false)
		if len(st.Failed) != 1 || st.Failed[0].Chain != blockChain || st.Failed[0].Set != blockSet {
			t.Fatalf("failures %+v, want only %s through %s", st.Failed, blockChain, blockSet)
		}
		kernel := save(t, nettest.Name(n))
		if !strings.Contains(kernel, "-A "+blockChain+` -m comment --comment "sluice could not program`) {
			t.Errorf("the poisoned policy's chain does not fail closed:\n%s", kernel)
		}
		// The control: the healthy policy is there in full.
		if !strings.Contains(kernel, "-A "+PolicyChain(fromY.Key, false)+" -m set --match-set") {
			t.Errorf("the healthy policy is not programmed:\n%s", kernel)
		}
		// The poisoned policy's pod, x/a, is denied from 10.244.x (the
		// default deny plus a chain that allows nothing); x/b still gets
		// y's traffic.
		rs := w.render([]*Policy{deny, fromBlock, fromY})
		rs.Chains[blockChain] = d.chains[blockChain]
		if forwardVerdict(t, rs, &packet{in: vethOf("y/a"), out: vethOf("x/a"), src: w.pods["y/a"].IPs[0], dst: w.pods["x/a"].IPs[0], proto: TCP, dport: 80}) {
			t.Error("the pod of the poisoned policy is open")
		}
		if !forwardVerdict(t, rs, &packet{in: vethOf("y/a"), out: vethOf("x/b"), src: w.pods["y/a"].IPs[0], dst: w.pods["x/b"].IPs[0], proto: TCP, dport: 80}) {
			t.Error("the healthy policy's pod does not get its allowed traffic")
		}
		// An unrelated change is written; the refused set is not tried
		// again in the same form.
		fromZ := np("x", "from-z", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "c"), Ingress: []networkingv1.NetworkPolicyIngressRule{{
			From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "z")}}}}})
		st, err = d.Apply(w.render([]*Policy{deny, fromBlock, fromY, fromZ}))
		if err != nil || st.ChainsWritten == 0 || len(st.Failed) != 1 {
			t.Errorf("unrelated change next to a poisoned object: %+v %v", st, err)
		}
		if tries != 1 {
			t.Errorf("the refused set was tried %d times, want once until it changes or a re-read", tries)
		}
		// The cause goes away and a re-read happens: the policy converges.
		fail = false
		k, err := d.Read()
		if err != nil {
			return err
		}
		d.Adopt(k)
		st, err = d.Apply(w.render([]*Policy{deny, fromBlock, fromY, fromZ}))
		if err != nil || len(st.Failed) != 0 {
			t.Fatalf("after the fix: %+v %v", st, err)
		}
		if kernel := save(t, nettest.Name(n)); !strings.Contains(kernel, "-A "+blockChain+" -m set --match-set "+blockSet) {
			t.Errorf("the fixed policy is not programmed:\n%s", kernel)
		}
		// Deleting a poisoned policy leaves nothing of it.
		fail = true
		poisonSet(d, blockSet, &fail, &tries)
		d.sets[blockSet] = "?" // as if never written
		if _, err := d.Apply(w.render([]*Policy{deny, fromY})); err != nil {
			return err
		}
		if names, _ := ipset.Names(blockSet); len(names) != 0 {
			t.Errorf("the deleted policy's set remains: %v", names)
		}
		return errors.Join(forward.Remove(r), d.Remove())
	})
}

// TestRefusedChainFailsClosedAlone: a policy chain that iptables-restore
// rejects (here: it names a set that does not exist, which the kernel
// refuses) fails closed on its own, and the rest is written.
func TestRefusedChainFailsClosedAlone(t *testing.T) {
	n := nettest.NewNS(t)
	w, deny, fromBlock, fromY, blockSet := poisonedWorld()
	nettest.Do(t, n, func() error {
		r, err := forwardingWriter()
		if err != nil {
			return err
		}
		d := NewDataplane(r, false)
		// The set "is written" but never made: the chain using it is
		// what the kernel refuses.
		d.syncSet = func(n, typ string, ipv6 bool, want []ipset.Entry) (int, error) {
			if n == blockSet {
				return 1, nil
			}
			return ipset.Sync(n, typ, ipv6, want)
		}
		st, err := d.Apply(w.render([]*Policy{deny, fromBlock, fromY}))
		if err != nil {
			t.Fatalf("one refused chain failed the whole apply: %v", err)
		}
		blockChain := PolicyChain(fromBlock.Key, false)
		if len(st.Failed) != 1 || st.Failed[0].Chain != blockChain || !strings.Contains(st.Failed[0].Reason, "iptables") {
			t.Fatalf("failures %+v, want %s refused by iptables-restore", st.Failed, blockChain)
		}
		kernel := save(t, nettest.Name(n))
		for _, want := range []string{
			"-A " + blockChain + ` -m comment --comment "sluice could not program`,
			"-A " + PolicyChain(fromY.Key, false) + " -m set --match-set",
			"-A " + EndpointChain(vethOf("x/a"), false) + " -m mark --mark 0x0/0x20000 -j " + blockChain,
		} {
			if !strings.Contains(kernel, want) {
				t.Errorf("missing %q:\n%s", want, kernel)
			}
		}
		// The next apply does not try the refused form again.
		st, err = d.Apply(w.render([]*Policy{deny, fromBlock, fromY}))
		if err != nil || st.ChainsWritten != 0 || len(st.Failed) != 1 {
			t.Errorf("second apply: %+v %v", st, err)
		}
		return errors.Join(forward.Remove(r), d.Remove())
	})
}
