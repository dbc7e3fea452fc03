package wireguard

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/sluice-net/sluice/internal/journal"
)

// Client reads and configures WireGuard devices by name, in wgctrl's
// types. *wgctrl.Client implements it for the kernel module; the agent's
// userspace devices implement it in process (see Userspace). Both backends
// are configured through Configure, so the configuration logic is one and
// is tested once.
type Client interface {
	Device(name string) (*wgtypes.Device, error)
	ConfigureDevice(name string, cfg wgtypes.Config) error
}

// Peer is a remote node's entry on a tunnel.
type Peer struct {
	Node      string
	PublicKey wgtypes.Key
	// Endpoint is the node's underlay address and WireGuard port.
	Endpoint netip.AddrPort
	// AllowedIPs are the node's pod subnets that the tunnel carries: the
	// only inner source addresses accepted from it, and the destinations
	// sent to it.
	AllowedIPs []netip.Prefix
}

// Tunnel is the wanted WireGuard configuration of one device.
type Tunnel struct {
	Name       string
	PrivateKey wgtypes.Key
	ListenPort int
	// PSK is mixed into every peer's handshake; nil for none.
	PSK       *wgtypes.Key
	Keepalive time.Duration
	Peers     []Peer
}

// ConfigChanges counts what Configure wrote: the device's key or port,
// peers added or updated, and peers removed.
type ConfigChanges struct {
	Device, Peers, Removed int
}

// Configure brings a device's WireGuard configuration to the tunnel. It
// writes only the differences, in one call: a peer whose entry is right is
// not touched, so its session and its traffic go on undisturbed.
func Configure(c Client, t Tunnel) (ConfigChanges, error) {
	have, err := c.Device(t.Name)
	if err != nil {
		return ConfigChanges{}, fmt.Errorf("reading WireGuard device %s: %w", t.Name, err)
	}
	cfg, ch := plan(have, t)
	if ch == (ConfigChanges{}) {
		return ch, nil
	}
	if err := c.ConfigureDevice(t.Name, cfg); err != nil {
		return ConfigChanges{}, fmt.Errorf("configuring WireGuard device %s: %w", t.Name, err)
	}
	journalPeers(t.Name, cfg)
	return ch, nil
}

// journalPeers records the peers a configuration wrote (sluicectl changes).
func journalPeers(dev string, cfg wgtypes.Config) {
	for _, p := range cfg.Peers {
		if p.Remove {
			journal.Default.Add("overlay", "wireguard peer", "remove", fmt.Sprintf("%s dev %s", p.PublicKey, dev))
			continue
		}
		var ips []string
		for _, n := range p.AllowedIPs {
			ips = append(ips, n.String())
		}
		ep := ""
		if p.Endpoint != nil {
			ep = " endpoint " + p.Endpoint.String()
		}
		journal.Default.Add("overlay", "wireguard peer", "set", fmt.Sprintf("%s%s allowed-ips %s dev %s", p.PublicKey, ep, strings.Join(ips, ","), dev))
	}
	if cfg.PrivateKey != nil || cfg.ListenPort != nil {
		journal.Default.Add("overlay", "wireguard device", "set", "key or listen port of "+dev)
	}
}

// plan computes the configuration that turns have into t. Removals come
// first, so a subnet that moved from a removed peer to a new one is not
// taken away from the new one.
func plan(have *wgtypes.Device, t Tunnel) (wgtypes.Config, ConfigChanges) {
	var cfg wgtypes.Config
	var ch ConfigChanges
	if have.PrivateKey != t.PrivateKey {
		k := t.PrivateKey
		cfg.PrivateKey = &k
		ch.Device++
	}
	if have.ListenPort != t.ListenPort {
		port := t.ListenPort
		cfg.ListenPort = &port
		ch.Device++
	}
	wanted := map[wgtypes.Key]Peer{}
	for _, p := range t.Peers {
		wanted[p.PublicKey] = p
	}
	current := map[wgtypes.Key]wgtypes.Peer{}
	for _, p := range have.Peers {
		current[p.PublicKey] = p
		if _, ok := wanted[p.PublicKey]; !ok {
			cfg.Peers = append(cfg.Peers, wgtypes.PeerConfig{PublicKey: p.PublicKey, Remove: true})
			ch.Removed++
		}
	}
	psk := wgtypes.Key{}
	if t.PSK != nil {
		psk = *t.PSK
	}
	for _, p := range t.Peers {
		cur, ok := current[p.PublicKey]
		if ok && peerMatches(cur, p, psk, t.Keepalive) {
			continue
		}
		ka, key := t.Keepalive, psk
		pc := wgtypes.PeerConfig{PublicKey: p.PublicKey, PresharedKey: &key, Endpoint: net.UDPAddrFromAddrPort(p.Endpoint),
			PersistentKeepaliveInterval: &ka, ReplaceAllowedIPs: true}
		for _, a := range p.AllowedIPs {
			pc.AllowedIPs = append(pc.AllowedIPs, net.IPNet{IP: a.Addr().AsSlice(), Mask: net.CIDRMask(a.Bits(), a.Addr().BitLen())})
		}
		cfg.Peers = append(cfg.Peers, pc)
		ch.Peers++
	}
	return cfg, ch
}

// peerMatches compares what a peer entry has with what is wanted. The
// endpoint counts too: WireGuard moves it to wherever authenticated
// packets come from (roaming), and the source filter admits only node
// addresses, but the entry is still put back to the published one.
func peerMatches(cur wgtypes.Peer, p Peer, psk wgtypes.Key, keepalive time.Duration) bool {
	if cur.PresharedKey != psk || cur.PersistentKeepaliveInterval != keepalive {
		return false
	}
	if cur.Endpoint == nil || unmapped(cur.Endpoint.AddrPort()) != unmapped(p.Endpoint) {
		return false
	}
	var have []netip.Prefix
	for _, n := range cur.AllowedIPs {
		a, _ := netip.AddrFromSlice(n.IP)
		ones, _ := n.Mask.Size()
		have = append(have, netip.PrefixFrom(a.Unmap(), ones))
	}
	want := slices.Clone(p.AllowedIPs)
	cmp := func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr())*256 + a.Bits() - b.Bits() }
	slices.SortFunc(have, cmp)
	slices.SortFunc(want, cmp)
	return slices.Equal(have, want)
}

func unmapped(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
