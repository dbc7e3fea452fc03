package srcfilter

import (
	"fmt"
	"io"
	"log"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

func init() { log.SetOutput(io.Discard) } // vishvananda/netlink's ipset notes

var modes = []iptables.Mode{iptables.ModeNFT, iptables.ModeLegacy}

func TestApplyCheckRepairRemove(t *testing.T) {
	for _, mode := range modes {
		for _, f := range fams {
			t.Run(string(mode)+"/"+f.name, func(t *testing.T) {
				n := nettest.NewNS(t)
				fam := map[bool]iptables.Family{false: iptables.IPv4, true: iptables.IPv6}[f.v6]
				nettest.Do(t, n, func() error { return applyCheckRepairRemove(t, fam, mode, f) })
			})
		}
	}
}

func applyCheckRepairRemove(t *testing.T, fam iptables.Family, mode iptables.Mode, f fam) error {
	r, err := iptables.New(fam, mode)
	if err != nil {
		return err
	}
	flt := Filter{Port: 8472, IPv6: f.v6}
	if flt.Check(r) {
		t.Error("Check passes before Apply")
	}
	if err := Remove(r, f.v6); err != nil {
		t.Errorf("Remove with nothing to remove: %v", err)
	}
	if _, err := flt.SyncSet([]netip.Addr{f.underlay(1), f.underlay(2)}); err != nil {
		return err
	}
	for i := 0; i < 2; i++ { // twice adds nothing
		if err := flt.Apply(r); err != nil {
			return err
		}
	}
	if !flt.Check(r) {
		live, _ := r.Rules("filter", Chain)
		t.Fatalf("Check after Apply fails; live:\n%s\nwant:\n%s", strings.Join(live, "\n"), strings.Join(flt.rules(), "\n"))
	}
	if in, _ := r.Rules("filter", "INPUT"); len(in) != 1 {
		t.Errorf("INPUT after two applies:\n%s", strings.Join(in, "\n"))
	}
	// Another program's ACCEPT above the jump would let VXLAN through:
	// Check sees it and Apply moves the jump back on top, keeping it.
	if err := r.Raw("-I", "INPUT", "1", "-p", "udp", "-j", "ACCEPT"); err != nil {
		return err
	}
	if flt.Check(r) {
		t.Error("Check passes with a foreign ACCEPT above the jump")
	}
	if err := flt.Apply(r); err != nil {
		return err
	}
	in, _ := r.Rules("filter", "INPUT")
	if len(in) != 2 || !strings.HasSuffix(in[0], "-j "+Chain) || !flt.Check(r) {
		t.Errorf("jump not moved back on top:\n%s", strings.Join(in, "\n"))
	}
	// A rule deleted by hand is drift.
	if err := r.Raw("-D", Chain, "2"); err != nil {
		return err
	}
	if flt.Check(r) {
		t.Error("Check passes without the DROP rule")
	}
	if err := flt.Apply(r); err != nil || !flt.Check(r) {
		t.Errorf("repair: %v", err)
	}
	if err := Remove(r, f.v6); err != nil {
		return err
	}
	if _, err := r.Rules("filter", Chain); err == nil {
		t.Error("chain remains after Remove")
	}
	if out, err := exec.Command("ipset", "list", flt.SetName()).CombinedOutput(); err == nil {
		t.Errorf("set remains after Remove:\n%s", out)
	}
	in, _ = r.Rules("filter", "INPUT")
	if len(in) != 1 || strings.Contains(in[0], Chain) {
		t.Errorf("INPUT after Remove (the foreign rule must stay):\n%s", strings.Join(in, "\n"))
	}
	return nil
}

func TestSyncSetHoldsExactlyTheNodes(t *testing.T) {
	n := nettest.NewNS(t)
	a, b, c, v6 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("192.0.2.3"), netip.MustParseAddr("2001:db8::1")
	flt := Filter{Port: 8472}
	nettest.Do(t, n, func() error {
		if ch, err := flt.SyncSet([]netip.Addr{a, b, v6}); err != nil || ch != 2 {
			t.Errorf("first sync: %d changes, %v; want 2 (the IPv6 address belongs to the other set)", ch, err)
		}
		if ch, err := flt.SyncSet([]netip.Addr{a, c}); err != nil || ch != 2 {
			t.Errorf("node b gone, c added: %d changes, %v; want 2", ch, err)
		}
		if ch, err := flt.SyncSet([]netip.Addr{c, a}); err != nil || ch != 0 {
			t.Errorf("same nodes: %d changes, %v", ch, err)
		}
		return nil
	})
	out := nettest.Run(t, "ip", "netns", "exec", nettest.Name(n), "ipset", "list", Set4)
	if !strings.Contains(out, "Type: hash:ip") || !strings.Contains(out, "192.0.2.1\n") || !strings.Contains(out, "192.0.2.3\n") || strings.Contains(out, "192.0.2.2\n") {
		t.Errorf("set:\n%s", out)
	}
}

// receiver collects the payloads of UDP datagrams that reach a pod.
type receiver struct {
	mu  sync.Mutex
	got []string
}

func listen(t *testing.T, pod ns.NetNS, ip netip.Addr) *receiver {
	var c net.PacketConn
	nettest.Do(t, pod, func() error {
		var err error
		c, err = net.ListenPacket("udp", net.JoinHostPort(ip.String(), "9000"))
		return err
	})
	t.Cleanup(func() { c.Close() })
	r := &receiver{}
	go func() {
		buf := make([]byte, 256)
		for {
			n, _, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			r.mu.Lock()
			r.got = append(r.got, string(buf[:n]))
			r.mu.Unlock()
		}
	}()
	return r
}

func (r *receiver) has(prefix string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, g := range r.got {
		if strings.HasPrefix(g, prefix) {
			return true
		}
	}
	return false
}

// send sends count datagrams from src (an address of the sending host's
// tunnel) to the pod.
func send(t *testing.T, from ns.NetNS, src, dst netip.Addr, payload string, count int) {
	nettest.Do(t, from, func() error {
		c, err := net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)), net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst, 9000)))
		if err != nil {
			return err
		}
		defer c.Close()
		for i := 0; i < count; i++ {
			if _, err := c.Write([]byte(payload + "-" + strconv.Itoa(i))); err != nil {
				return fmt.Errorf("sending %s: %w", payload, err)
			}
		}
		return nil
	})
}

// sendUntil sends one datagram at a time until the pod has one, for at most
// five seconds, and reports whether one arrived. The wait bounds a
// failure; nothing about its length is asserted.
func sendUntil(t *testing.T, from ns.NetNS, src, dst netip.Addr, payload string, r *receiver) bool {
	for i := 0; i < 50; i++ {
		send(t, from, src, dst, payload, 1)
		time.Sleep(100 * time.Millisecond)
		if r.has(payload) {
			return true
		}
	}
	return false
}

// dropped reads the packet counter of the filter's DROP rule.
func dropped(t *testing.T, h *host, v6 bool) int {
	bin := map[bool]string{false: "iptables-nft", true: "ip6tables-nft"}[v6]
	out := nettest.Run(t, "ip", "netns", "exec", h.name(), bin, "-w", "-L", Chain, "-v", "-x", "-n")
	for _, l := range strings.Split(out, "\n") {
		if f := strings.Fields(l); len(f) > 2 && f[2] == "DROP" {
			n, _ := strconv.Atoi(f[0])
			return n
		}
	}
	t.Fatalf("no DROP rule in %s:\n%s", Chain, out)
	return 0
}
