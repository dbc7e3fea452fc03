package cleanup_test

import (
	"io"
	"log"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/sluice-net/sluice/cni"
	"github.com/sluice-net/sluice/internal/cleanup"
	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/forward"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
	"github.com/sluice-net/sluice/overlay/masq"
	"github.com/sluice-net/sluice/overlay/srcfilter"
	"github.com/sluice-net/sluice/overlay/vxlan"
	"github.com/sluice-net/sluice/policy"
)

func init() { log.SetOutput(io.Discard) } // vishvananda/netlink's ipset notes

// podVeth is what the CNI plugin names a pod's host veth.
var podVeth = cni.HostVethName("default", "web", "")

// saveBinaries are every iptables backend and family; the test reads all.
var saveBinaries = []string{"iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"}

// programNode builds what the agent and the plugin leave on a node, with
// their own code, in the namespace: tunnels and routes in both families,
// masquerade, forwarding and policy chains in both backends, ipsets, a pod
// veth with its routes, and the agent's files. Next to them it puts
// another program's things, which must survive.
func programNode(t *testing.T, node, pod ns.NetNS, runDir, stateDir string) {
	name := nettest.Name(node)
	nettest.Run(t, "ip", "-n", name, "link", "add", "up0", "type", "veth", "peer", "name", "up1")
	nettest.Run(t, "ip", "-n", name, "addr", "add", "192.0.2.1/24", "dev", "up0")
	nettest.Run(t, "ip", "-n", name, "addr", "add", "2001:db8::1/64", "dev", "up0", "nodad")
	nettest.Run(t, "ip", "-n", name, "link", "set", "up0", "up")
	nettest.Run(t, "ip", "-n", name, "link", "set", "up1", "up")
	// The pod's veth, as the plugin wires it: host end in the node, /32
	// and /128 routes to the pod through it.
	nettest.Run(t, "ip", "-n", name, "link", "add", podVeth, "type", "veth", "peer", "name", "eth0", "netns", nettest.Name(pod))
	nettest.Run(t, "ip", "-n", name, "link", "set", podVeth, "up")
	nettest.Run(t, "ip", "-n", name, "route", "add", "10.244.1.5/32", "dev", podVeth, "scope", "link")
	nettest.Run(t, "ip", "-n", name, "-6", "route", "add", "fd00:10:244:1::5/128", "dev", podVeth)
	// Another program's things: a chain and rules in both tables, a route,
	// a set, and links whose names look like ours but whose type is not.
	nettest.Run(t, "ip", "-n", name, "link", "add", "sl0123456789f", "type", "bridge")
	nettest.Run(t, "ip", "-n", name, "link", "add", "slack0", "type", "veth", "peer", "name", "slack1")
	nettest.Run(t, "ip", "-n", name, "route", "add", "10.9.0.0/24", "via", "192.0.2.3", "proto", "static")
	// The userspace WireGuard tunnel as a stopped agent leaves it: a
	// persistent TUN device; and another program's TUN device.
	nettest.Run(t, "ip", "-n", name, "tuntap", "add", "dev", "wg-sluice", "mode", "tun")
	nettest.Run(t, "ip", "-n", name, "tuntap", "add", "dev", "wg-other", "mode", "tun")

	nettest.Do(t, node, func() error {
		up, err := netlink.LinkByName("up0")
		if err != nil {
			return err
		}
		for _, v6 := range []bool{false, true} {
			tab := vxlan.Table{Own: netip.MustParsePrefix("10.244.1.0/24"), UnderlayIndex: up.Attrs().Index,
				Peers: []vxlan.Peer{{Node: "b", Subnet: netip.MustParsePrefix("10.244.2.0/24"), PublicIP: netip.MustParseAddr("192.0.2.2"), VtepMAC: mac(2)}}}
			dev := vxlan.Device{Name: "vx-sluice.1", VNI: 1, Port: 8472, LocalIP: netip.MustParseAddr("192.0.2.1"), UnderlayIndex: up.Attrs().Index,
				MTU: 1450, MAC: mac(1), VTEPAddr: netip.MustParseAddr("10.244.1.0")}
			if v6 {
				tab.Own, tab.Peers[0].Subnet, tab.Peers[0].PublicIP = netip.MustParsePrefix("fd00:10:244:1::/64"), netip.MustParsePrefix("fd00:10:244:2::/64"), netip.MustParseAddr("2001:db8::2")
				dev.MTU, dev.Name, dev.LocalIP, dev.VTEPAddr, dev.MAC = 1430, "vx6-sluice.1", netip.MustParseAddr("2001:db8::1"), netip.MustParseAddr("fd00:10:244:1::"), mac(3)
			}
			tab.Device = &dev
			if _, err := vxlan.Sync(tab); err != nil {
				return err
			}
		}
		for _, mode := range []iptables.Mode{iptables.ModeNFT, iptables.ModeLegacy} {
			for _, fam := range []iptables.Family{iptables.IPv4, iptables.IPv6} {
				r, err := iptables.New(fam, mode)
				if err != nil {
					return err
				}
				network := "10.244.0.0/16"
				if fam == iptables.IPv6 {
					network = "fd00:10:244::/56"
				}
				if err := (masq.Rules{Network: netip.MustParsePrefix(network)}).Apply(r); err != nil {
					return err
				}
				if err := forward.Apply(r); err != nil {
					return err
				}
				// The overlay's VXLAN source filter: a jump from INPUT, a
				// chain and a set of known node addresses per family.
				flt := srcfilter.Filter{Port: 8472, IPv6: fam == iptables.IPv6}
				if _, err := flt.SyncSet([]netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}); err != nil {
					return err
				}
				if err := flt.Apply(r); err != nil {
					return err
				}
				set, entry := "SLUICE-S4-test", "10.244.2.5/32"
				if fam == iptables.IPv6 {
					set, entry = "SLUICE-S6-test", "fd00:10:244:2::5/128"
				}
				fw := "SLUICE-FW-" + strings.TrimPrefix(podVeth, "sl")
				rs := &policy.Ruleset{
					Chains: map[string][]string{
						contract.FromPodChain: {"-A " + contract.FromPodChain + " -i " + podVeth + " -j " + fw},
						contract.ToPodChain:   {},
						contract.ToHostChain:  {},
						fw:                    {"-A " + fw + " -m set --match-set " + set + " dst -j RETURN", "-A " + fw + " -j DROP"},
					},
					Sets: map[string]*policy.Set{set: {Name: set, Type: policy.HashNet, IPv6: fam == iptables.IPv6, Entries: []string{entry}}},
				}
				if _, err := policy.NewDataplane(r, fam == iptables.IPv6).Apply(rs); err != nil {
					return err
				}
				for _, args := range [][]string{
					{"-N", "FOREIGN"}, {"-A", "FOREIGN", "-j", "ACCEPT"}, {"-A", "FORWARD", "-j", "FOREIGN"},
					{"-t", "nat", "-A", "POSTROUTING", "-o", "up0", "-j", "MASQUERADE"},
				} {
					if err := r.Raw(args...); err != nil {
						return err
					}
				}
			}
		}
		return exec.Command("ipset", "create", "KUBE-FOREIGN", "hash:ip").Run()
	})

	os.MkdirAll(runDir, 0o755)
	os.WriteFile(filepath.Join(runDir, "subnet.env"), []byte("SLUICE_SUBNET=10.244.1.0/24\n"), 0o644)
	os.WriteFile(filepath.Join(runDir, ".subnet.env.tmp123"), nil, 0o644)
	if ln, err := net.Listen("unix", filepath.Join(runDir, "sluiced.sock")); err == nil {
		// A stale socket, as a killed agent leaves it.
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
	}
	os.MkdirAll(filepath.Join(stateDir, "endpoints"), 0o700)
	os.WriteFile(filepath.Join(stateDir, "endpoints", "c1_eth0.json"), []byte("{}"), 0o600)
	os.WriteFile(filepath.Join(stateDir, "wireguard.key"), []byte("key\n"), 0o600)
}

func mac(b byte) net.HardwareAddr { return net.HardwareAddr{0x02, 0, 0, 0, 0, b} }

// leftovers reads the namespace back and lists everything of Sluice's
// that is still there, and everything of the other program's that is not.
func leftovers(t *testing.T, node ns.NetNS) []string {
	name := nettest.Name(node)
	var left []string
	links := nettest.Run(t, "ip", "-n", name, "-o", "link", "show")
	for _, l := range []string{"vx-sluice.1", "vx6-sluice.1", podVeth + "@", "wg-sluice:"} {
		if strings.Contains(links, ": "+l) {
			left = append(left, "link "+l)
		}
	}
	for _, l := range []string{"sl0123456789f:", "slack0@", "up0@", "wg-other:"} {
		if !strings.Contains(links, ": "+l) {
			left = append(left, "other's link gone: "+l)
		}
	}
	for _, fam := range []string{"-4", "-6"} {
		routes := nettest.Run(t, "ip", "-n", name, fam, "route", "show", "table", "all")
		for _, l := range strings.Split(routes, "\n") {
			if strings.Contains(l, "proto 98") || strings.Contains(l, "10.244.") || strings.Contains(l, "fd00:10:244:") || strings.Contains(l, "blackhole") {
				left = append(left, "route "+l)
			}
		}
		if fam == "-4" && !strings.Contains(routes, "10.9.0.0/24 via 192.0.2.3 dev up0 proto static") {
			left = append(left, "other's route gone:\n"+routes)
		}
	}
	for _, bin := range saveBinaries {
		out := nettest.Run(t, "ip", "netns", "exec", name, bin)
		for _, l := range strings.Split(out, "\n") {
			if strings.Contains(l, "SLUICE") || strings.Contains(strings.ToLower(l), "sluice") {
				left = append(left, bin+": "+l)
			}
		}
		for _, want := range []string{"-A FORWARD -j FOREIGN", "-A FOREIGN -j ACCEPT", "-A POSTROUTING -o up0 -j MASQUERADE"} {
			if !strings.Contains(out, want) {
				left = append(left, bin+": other's rule gone: "+want)
			}
		}
	}
	sets := nettest.Run(t, "ip", "netns", "exec", name, "ipset", "list", "-n")
	for _, s := range strings.Fields(sets) {
		if strings.HasPrefix(s, "SLUICE-") {
			left = append(left, "ipset "+s)
		}
	}
	if !strings.Contains(sets, "KUBE-FOREIGN") {
		left = append(left, "other's ipset gone")
	}
	return left
}

func TestCleanupRemovesOnlySluice(t *testing.T) {
	node, pod := nettest.NewNS(t), nettest.NewNS(t)
	dir := t.TempDir()
	runDir, stateDir := filepath.Join(dir, "run", "sluice"), filepath.Join(dir, "lib", "sluice")
	programNode(t, node, pod, runDir, stateDir)
	// The test must see what it later proves gone.
	before := leftovers(t, node)
	if len(before) < 3+2+4 {
		t.Fatalf("the node was not programmed as expected; found only %v", before)
	}
	for _, want := range []string{"-j " + srcfilter.Chain, "ipset " + srcfilter.Set4, "ipset " + srcfilter.Set6} {
		if !strings.Contains(strings.Join(before, "\n"), want) {
			t.Fatalf("the VXLAN source filter was not programmed (%q missing): %v", want, before)
		}
	}

	var removed []string
	nettest.Do(t, node, func() error {
		var err error
		removed, err = cleanup.Kernel()
		return err
	})
	files, err := cleanup.Files(runDir, stateDir)
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) == 0 || len(files) == 0 {
		t.Errorf("cleanup reported removing nothing: %v %v", removed, files)
	}
	for _, l := range leftovers(t, node) {
		t.Error(l)
	}
	for _, p := range []string{runDir, stateDir} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s remains: %v", p, err)
		}
	}
	if out := nettest.Run(t, "ip", "-n", nettest.Name(pod), "-o", "link"); strings.Contains(out, "eth0") {
		t.Errorf("the pod's end of the veth remains:\n%s", out)
	}

	// Twice is fine, and finds nothing.
	nettest.Do(t, node, func() error {
		again, err := cleanup.Kernel()
		if len(again) != 0 {
			t.Errorf("second run removed %v", again)
		}
		return err
	})
	if again, err := cleanup.Files(runDir, stateDir); err != nil || len(again) != 0 {
		t.Errorf("second run on files: %v %v", again, err)
	}
}

// TestCleanupOfAnUntouchedNode: on a node where Sluice never ran, cleanup
// succeeds and removes nothing, and keeps a run dir with others' files.
func TestCleanupOfAnUntouchedNode(t *testing.T) {
	node := nettest.NewNS(t)
	nettest.Do(t, node, func() error {
		removed, err := cleanup.Kernel()
		if len(removed) != 0 {
			t.Errorf("removed %v", removed)
		}
		return err
	})
	runDir := t.TempDir()
	os.WriteFile(filepath.Join(runDir, "someone-else"), nil, 0o644)
	if removed, err := cleanup.Files(runDir, filepath.Join(t.TempDir(), "none")); err != nil || len(removed) != 0 {
		t.Errorf("files: %v %v", removed, err)
	}
	if _, err := os.Stat(filepath.Join(runDir, "someone-else")); err != nil {
		t.Errorf("another program's file is gone: %v", err)
	}
}
