package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"sort"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

// dualStackWorld is namespace x with pods a, b and c, each with an IPv4 and
// an IPv6 address, and addresses outside the pods at the edges of the
// address space and of the blocks the cases use.
type dualStackWorld struct {
	pods     map[string]*Pod
	nss      map[string]*Namespace
	outside4 []netip.Addr
	outside6 []netip.Addr
}

func newDualStackWorld() *dualStackWorld {
	w := &dualStackWorld{pods: map[string]*Pod{}, nss: map[string]*Namespace{"x": {Name: "x", Labels: labels.Set{"ns": "x"}}}}
	for i, name := range []string{"a", "b", "c"} {
		w.pods["x/"+name] = &Pod{Namespace: "x", Name: name, Labels: labels.Set{"pod": name},
			IPs: []netip.Addr{netip.AddrFrom4([4]byte{10, 244, 1, byte(i + 2)}), netip.MustParseAddr(fmt.Sprintf("fd00:10:244:1::%d", i+2))}}
	}
	for _, s := range []string{"0.0.0.1", "10.0.0.1", "10.244.0.1", "10.244.1.200", "10.244.128.1", "127.255.255.255", "128.0.0.0",
		"198.18.0.1", "198.18.0.254", "203.0.113.7", "255.255.255.254"} {
		w.outside4 = append(w.outside4, netip.MustParseAddr(s))
	}
	for _, s := range []string{"::2", "2001:db8::1", "7fff:ffff::1", "8000::", "fd00::1", "fd00:10:244:1::99", "fd00:10:244:2::1", "ffff::1"} {
		w.outside6 = append(w.outside6, netip.MustParseAddr(s))
	}
	return w
}

func (w *dualStackWorld) keys() []string {
	keys := make([]string, 0, len(w.pods))
	for k := range w.pods {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func (w *dualStackWorld) render(pols []*Policy, ipv6 bool) *Ruleset {
	m := map[string]*Policy{}
	for _, p := range pols {
		m[p.Key] = p
	}
	var eps []LocalEndpoint
	var pods []*Pod
	for _, k := range w.keys() {
		pod := w.pods[k]
		pods = append(pods, pod)
		in, out := Selecting(m, pod, nil)
		eps = append(eps, LocalEndpoint{Pod: pod, HostVeth: vethOf(k), Ingress: in, Egress: out})
	}
	return (&Renderer{IPv6: ipv6, AcceptMark: 0x10000}).Render(m, eps, pods, w.nss)
}

func ipBlocks(blocks ...networkingv1.IPBlock) []networkingv1.NetworkPolicyPeer {
	var peers []networkingv1.NetworkPolicyPeer
	for i := range blocks {
		peers = append(peers, networkingv1.NetworkPolicyPeer{IPBlock: &blocks[i]})
	}
	return peers
}

func egressTo(name string, blocks ...networkingv1.IPBlock) *Policy {
	return np("x", name, networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"),
		PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
		Egress:      []networkingv1.NetworkPolicyEgressRule{{To: ipBlocks(blocks...)}}})
}

func ingressFrom(name string, blocks ...networkingv1.IPBlock) *Policy {
	return np("x", name, networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"),
		PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
		Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: ipBlocks(blocks...)}}})
}

type ipBlockCase struct {
	name string
	pols []*Policy
}

// ipBlockCases is the matrix of issue #10: every edge of ipBlock, in both
// directions and both families.
func ipBlockCases() []ipBlockCase {
	var cases []ipBlockCase
	blocks := []struct {
		name   string
		blocks []networkingv1.IPBlock
	}{
		{"v4 /0", []networkingv1.IPBlock{{CIDR: "0.0.0.0/0"}}},
		{"v6 /0", []networkingv1.IPBlock{{CIDR: "::/0"}}},
		{"both /0", []networkingv1.IPBlock{{CIDR: "0.0.0.0/0"}, {CIDR: "::/0"}}},
		{"v4 /0 except the pods' /16", []networkingv1.IPBlock{{CIDR: "0.0.0.0/0", Except: []string{"10.244.0.0/16"}}}},
		{"v6 /0 except fd00::/8", []networkingv1.IPBlock{{CIDR: "::/0", Except: []string{"fd00::/8"}}}},
		{"v4 /0 except a half", []networkingv1.IPBlock{{CIDR: "0.0.0.0/0", Except: []string{"0.0.0.0/1", "192.0.0.0/2"}}}},
		{"v6 /0 except a half", []networkingv1.IPBlock{{CIDR: "::/0", Except: []string{"8000::/1", "::/2"}}}},
		{"v4 /0 except both halves", []networkingv1.IPBlock{{CIDR: "0.0.0.0/0", Except: []string{"0.0.0.0/1", "128.0.0.0/1"}}}},
		{"/32 of pod b", []networkingv1.IPBlock{{CIDR: "10.244.1.3/32"}}},
		{"/128 of pod b", []networkingv1.IPBlock{{CIDR: "fd00:10:244:1::3/128"}}},
		{"except equal to the cidr", []networkingv1.IPBlock{{CIDR: "10.244.0.0/16", Except: []string{"10.244.0.0/16"}}}},
		{"v6 except equal to the cidr", []networkingv1.IPBlock{{CIDR: "fd00:10:244::/48", Except: []string{"fd00:10:244::/48"}}}},
		{"nested excepts", []networkingv1.IPBlock{{CIDR: "10.0.0.0/8", Except: []string{"10.244.0.0/16", "10.244.1.0/24"}}}},
		{"overlapping excepts", []networkingv1.IPBlock{{CIDR: "10.0.0.0/8", Except: []string{"10.244.0.0/17", "10.244.0.0/16", "10.244.1.3/32"}}}},
		{"duplicate excepts", []networkingv1.IPBlock{{CIDR: "10.244.0.0/16", Except: []string{"10.244.1.3/32", "10.244.1.3/32"}}}},
		{"several ipBlocks", []networkingv1.IPBlock{{CIDR: "10.244.1.2/31"}, {CIDR: "198.18.0.0/24", Except: []string{"198.18.0.254/32"}}, {CIDR: "fd00:10:244:1::3/128"}}},
		{"host bits set", []networkingv1.IPBlock{{CIDR: "10.244.1.77/24", Except: []string{"10.244.1.3/31"}}}},
		{"v6 host bits set", []networkingv1.IPBlock{{CIDR: "fd00:10:244:1::77/64", Except: []string{"fd00:10:244:1::3/127"}}}},
		{"v4 only in a dual-stack cluster", []networkingv1.IPBlock{{CIDR: "10.244.1.0/24"}}},
		{"v6 only in a dual-stack cluster", []networkingv1.IPBlock{{CIDR: "fd00:10:244:1::/64"}}},
	}
	for _, b := range blocks {
		cases = append(cases,
			ipBlockCase{"egress to " + b.name, []*Policy{egressTo("e", b.blocks...)}},
			ipBlockCase{"ingress from " + b.name, []*Policy{ingressFrom("i", b.blocks...)}})
	}
	return cases
}

// TestIPBlockMatrix traces every pod pair and every outside address, in
// both directions and both families, through the rendered rules of every
// ipBlock edge case, and compares with the reference semantics.
func TestIPBlockMatrix(t *testing.T) {
	w := newDualStackWorld()
	for _, c := range ipBlockCases() {
		if c.pols[0].Broken != "" {
			t.Fatalf("%s: %s", c.name, c.pols[0].Broken)
		}
		for fi, ipv6 := range []bool{false, true} {
			rs := w.render(c.pols, ipv6)
			outside := w.outside4
			if ipv6 {
				outside = w.outside6
			}
			for _, from := range w.keys() {
				src := w.pods[from]
				for _, to := range w.keys() {
					if from == to {
						continue
					}
					dst := w.pods[to]
					p := &packet{in: vethOf(from), out: vethOf(to), src: src.IPs[fi], dst: dst.IPs[fi], proto: TCP, dport: 80}
					want := Allowed(c.pols, Endpoint{Pod: src, Namespace: w.nss["x"], IP: src.IPs[fi]}, Endpoint{Pod: dst, Namespace: w.nss["x"], IP: dst.IPs[fi]}, TCP, 80)
					if got := forwardVerdict(t, rs, p); got != want {
						t.Errorf("%s (ipv6=%v): %s -> %s: rules say %v, reference %v", c.name, ipv6, from, to, got, want)
					}
				}
				self := Endpoint{Pod: src, Namespace: w.nss["x"], IP: src.IPs[fi]}
				for _, ip := range outside {
					out := Endpoint{IP: ip}
					p := &packet{in: vethOf(from), src: src.IPs[fi], dst: ip, proto: TCP, dport: 80}
					if got, want := forwardVerdict(t, rs, p), Allowed(c.pols, self, out, TCP, 80); got != want {
						t.Errorf("%s: %s -> %s: rules say %v, reference %v", c.name, from, ip, got, want)
					}
					p = &packet{out: vethOf(from), src: ip, dst: src.IPs[fi], proto: TCP, dport: 80}
					if got, want := forwardVerdict(t, rs, p), Allowed(c.pols, out, self, TCP, 80); got != want {
						t.Errorf("%s: %s -> %s: rules say %v, reference %v", c.name, ip, from, got, want)
					}
				}
			}
		}
	}
}

// TestIPBlockEntries pins the set content of the cases the kernel cares
// about: no /0 (ipset refuses it), no entry twice (nomatch is a flag on
// the same element).
func TestIPBlockEntries(t *testing.T) {
	p := netip.MustParsePrefix
	for _, c := range []struct {
		cidr   string
		except []string
		want   []string
	}{
		{"0.0.0.0/0", nil, []string{"0.0.0.0/1", "128.0.0.0/1"}},
		{"::/0", nil, []string{"::/1", "8000::/1"}},
		{"0.0.0.0/0", []string{"10.0.0.0/8"}, []string{"0.0.0.0/1", "128.0.0.0/1", "10.0.0.0/8 nomatch"}},
		{"0.0.0.0/0", []string{"128.0.0.0/1", "192.0.0.0/2", "10.0.0.0/8"}, []string{"0.0.0.0/1", "10.0.0.0/8 nomatch"}},
		{"0.0.0.0/0", []string{"0.0.0.0/0"}, nil},
		{"10.0.0.0/8", []string{"10.0.0.0/8"}, nil},
		{"10.0.0.0/8", []string{"0.0.0.0/1"}, nil},
		{"10.0.0.0/8", []string{"10.1.0.0/16", "10.1.0.0/16", "11.0.0.0/8", "fd00::/8"}, []string{"10.0.0.0/8", "10.1.0.0/16 nomatch"}},
		{"10.1.2.3/32", nil, []string{"10.1.2.3/32"}},
	} {
		var ex []netip.Prefix
		for _, e := range c.except {
			ex = append(ex, p(e))
		}
		if got := ipBlockEntries(p(c.cidr), ex); !slices.Equal(got, c.want) {
			t.Errorf("%s except %v: got %v, want %v", c.cidr, c.except, got, c.want)
		}
	}
}

// TestIPBlockMatrixLoads writes every case's rules and sets into a real
// kernel, both families: each must load (the /0 of issue #10 did not).
func TestIPBlockMatrixLoads(t *testing.T) {
	n := nettest.NewNS(t)
	w := newDualStackWorld()
	var all []*Policy
	for i, c := range ipBlockCases() {
		p := *c.pols[0]
		p.Key = fmt.Sprintf("x/case-%d", i)
		all = append(all, &p)
	}
	nettest.Do(t, n, func() error {
		for _, ipv6 := range []bool{false, true} {
			fam := iptables.IPv4
			if ipv6 {
				fam = iptables.IPv6
			}
			r, err := iptables.New(fam, iptables.ModeNFT)
			if err != nil {
				return err
			}
			d := NewDataplane(r, ipv6)
			rs := w.render(all, ipv6)
			if _, err := d.Apply(rs); err != nil {
				return fmt.Errorf("ipv6=%v: %w", ipv6, err)
			}
			// A fresh writer over the same kernel finds nothing to change.
			if st, err := NewDataplane(r, ipv6).Apply(rs); err != nil || st.ChainsWritten+st.SetsChanged != 0 {
				t.Errorf("ipv6=%v: re-apply over the kernel changed %+v (%v)", ipv6, st, err)
			}
			if err := d.Remove(); err != nil {
				return err
			}
		}
		return nil
	})
}
