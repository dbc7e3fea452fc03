package masq

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

func TestApplyCheckRepairRemove(t *testing.T) {
	for _, mode := range []iptables.Mode{iptables.ModeNFT, iptables.ModeLegacy} {
		for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
			t.Run(string(mode)+"/"+map[iptables.Family]string{4: "ipv4", 6: "ipv6"}[fam], func(t *testing.T) {
				n := nettest.NewNS(t)
				network := netip.MustParsePrefix("10.244.0.0/16")
				if fam == iptables.IPv6 {
					network = netip.MustParsePrefix("fd00:10:244::/56")
				}
				nettest.Do(t, n, func() error {
					r, err := iptables.New(fam, mode)
					if err != nil {
						return err
					}
					m := Rules{Network: network, RandomFully: r.HasRandomFully()}
					// Someone else's rule in POSTROUTING must survive.
					if err := r.EnsureJump("nat", "POSTROUTING", "OTHER", "another program"); err != nil {
						return err
					}
					if err := m.Apply(r); err != nil {
						return err
					}
					if ok, err := m.Check(r); err != nil || !ok {
						live, _ := r.Rules("nat", Chain)
						t.Fatalf("Check after Apply = %v, %v; live rules:\n%s\nwant:\n%s", ok, err, strings.Join(live, "\n"), strings.Join(m.rules(), "\n"))
					}
					// Applying twice adds nothing.
					if err := m.Apply(r); err != nil {
						return err
					}
					post, _ := r.Rules("nat", "POSTROUTING")
					if len(post) != 2 {
						t.Errorf("POSTROUTING has %d rules after two applies, want 2:\n%s", len(post), strings.Join(post, "\n"))
					}
					// Drift: a rule deleted by hand is seen and repaired.
					if err := runIn(r, "-t", "nat", "-D", Chain, "1"); err != nil {
						return err
					}
					if ok, _ := m.Check(r); ok {
						t.Error("Check missed a deleted rule")
					}
					if err := m.Apply(r); err != nil {
						return err
					}
					if ok, _ := m.Check(r); !ok {
						t.Error("Apply did not repair the chain")
					}
					if err := Remove(r); err != nil {
						return err
					}
					post, _ = r.Rules("nat", "POSTROUTING")
					if len(post) != 1 || !strings.Contains(post[0], "OTHER") {
						t.Errorf("after Remove, POSTROUTING = %v; want only the other program's jump", post)
					}
					return nil
				})
			})
		}
	}
}

func runIn(r *iptables.Runner, args ...string) error { return r.Raw(args...) }

func TestRenderIsExact(t *testing.T) {
	got := string(Rules{Network: netip.MustParsePrefix("10.244.0.0/16"), RandomFully: true}.Render())
	want := `:SLUICE-POSTROUTING - [0:0]
-A SLUICE-POSTROUTING -m mark --mark 0x4000/0x4000 -m comment --comment "kube-proxy masquerades these" -j RETURN
-A SLUICE-POSTROUTING -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "pod to pod keeps its source" -j RETURN
-A SLUICE-POSTROUTING -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "pod to outside" -j MASQUERADE --random-fully
`
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
}
