package wireguard

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// fakeClient stands where wgctrl's kernel client does: it keeps one
// device and applies configurations the way the kernel module does.
type fakeClient struct {
	dev     wgtypes.Device
	configs []wgtypes.Config
}

func (f *fakeClient) Device(name string) (*wgtypes.Device, error) {
	d := f.dev
	d.Peers = append([]wgtypes.Peer(nil), f.dev.Peers...)
	return &d, nil
}

func (f *fakeClient) ConfigureDevice(name string, cfg wgtypes.Config) error {
	f.configs = append(f.configs, cfg)
	if cfg.PrivateKey != nil {
		f.dev.PrivateKey = *cfg.PrivateKey
	}
	if cfg.ListenPort != nil {
		f.dev.ListenPort = *cfg.ListenPort
	}
	for _, pc := range cfg.Peers {
		i := -1
		for j, p := range f.dev.Peers {
			if p.PublicKey == pc.PublicKey {
				i = j
			}
		}
		if pc.Remove {
			if i >= 0 {
				f.dev.Peers = append(f.dev.Peers[:i], f.dev.Peers[i+1:]...)
			}
			continue
		}
		if i < 0 {
			f.dev.Peers = append(f.dev.Peers, wgtypes.Peer{PublicKey: pc.PublicKey})
			i = len(f.dev.Peers) - 1
		}
		p := &f.dev.Peers[i]
		if pc.PresharedKey != nil {
			p.PresharedKey = *pc.PresharedKey
		}
		if pc.Endpoint != nil {
			p.Endpoint = pc.Endpoint
		}
		if pc.PersistentKeepaliveInterval != nil {
			p.PersistentKeepaliveInterval = *pc.PersistentKeepaliveInterval
		}
		if pc.ReplaceAllowedIPs {
			p.AllowedIPs = nil
		}
		p.AllowedIPs = append(p.AllowedIPs, pc.AllowedIPs...)
	}
	return nil
}

func key(t *testing.T) wgtypes.Key {
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func peer(t *testing.T, ip string, subnets ...string) Peer {
	p := Peer{Node: ip, PublicKey: key(t).PublicKey(), Endpoint: netip.AddrPortFrom(netip.MustParseAddr(ip), 51820)}
	for _, s := range subnets {
		p.AllowedIPs = append(p.AllowedIPs, netip.MustParsePrefix(s))
	}
	return p
}

// The kernel implementation's configuration, through the same Configure
// the userspace one uses: only differences are written, and a correct
// peer is never rewritten (which would reset its session).
func TestConfigureWritesOnlyDifferences(t *testing.T) {
	f := &fakeClient{}
	b, c := peer(t, "192.0.2.2", "10.244.2.0/24"), peer(t, "192.0.2.3", "10.244.3.0/24", "fd00:3::/64")
	tun := Tunnel{Name: "wg-sluice", PrivateKey: key(t), ListenPort: 51820, Keepalive: 25 * time.Second, Peers: []Peer{b, c}}
	ch, err := Configure(f, tun)
	if err != nil || ch != (ConfigChanges{Device: 2, Peers: 2}) {
		t.Fatalf("first configure: %+v %v", ch, err)
	}
	if ch, _ := Configure(f, tun); ch != (ConfigChanges{}) || len(f.configs) != 1 {
		t.Errorf("configure over a correct device wrote %+v (%d calls)", ch, len(f.configs))
	}
	// Roaming or a hand edit moved c's endpoint: put back, b untouched.
	f.dev.Peers[1].Endpoint = &net.UDPAddr{IP: net.ParseIP("198.51.100.9"), Port: 4444}
	ch, _ = Configure(f, tun)
	last := f.configs[len(f.configs)-1]
	if ch != (ConfigChanges{Peers: 1}) || len(last.Peers) != 1 || last.Peers[0].PublicKey != c.PublicKey || !last.Peers[0].ReplaceAllowedIPs {
		t.Errorf("endpoint drift: %+v, config %+v", ch, last)
	}
	// Node c goes, d comes with c's subnet: the removal comes first.
	d := peer(t, "192.0.2.4", "10.244.3.0/24")
	tun.Peers = []Peer{b, d}
	ch, _ = Configure(f, tun)
	last = f.configs[len(f.configs)-1]
	if ch != (ConfigChanges{Peers: 1, Removed: 1}) || !last.Peers[0].Remove || last.Peers[0].PublicKey != c.PublicKey {
		t.Errorf("peer replaced: %+v, config %+v", ch, last)
	}
	// A rotated key and a PSK: the device's key and every peer change.
	psk := key(t)
	tun.PrivateKey, tun.PSK = key(t), &psk
	if ch, _ := Configure(f, tun); ch != (ConfigChanges{Device: 1, Peers: 2}) {
		t.Errorf("rotation and PSK: %+v", ch)
	}
	if ch, _ := Configure(f, tun); ch != (ConfigChanges{}) {
		t.Errorf("after rotation: %+v", ch)
	}
}

func TestUAPIRoundTrip(t *testing.T) {
	priv, psk := key(t), key(t)
	port, ka := 51820, 25*time.Second
	pub := key(t).PublicKey()
	cfg := wgtypes.Config{PrivateKey: &priv, ListenPort: &port, Peers: []wgtypes.PeerConfig{{
		PublicKey: pub, PresharedKey: &psk, Endpoint: &net.UDPAddr{IP: net.ParseIP("fd00::2"), Port: 51821},
		PersistentKeepaliveInterval: &ka, ReplaceAllowedIPs: true,
		AllowedIPs: []net.IPNet{{IP: net.ParseIP("fd00:2::"), Mask: net.CIDRMask(64, 128)}},
	}}}
	text := encodeConfig(cfg)
	for _, want := range []string{"listen_port=51820\n", "endpoint=[fd00::2]:51821\n", "persistent_keepalive_interval=25\n", "replace_allowed_ips=true\n", "allowed_ip=fd00:2::/64\n"} {
		if !strings.Contains(text, want) {
			t.Errorf("set text lacks %q:\n%s", want, text)
		}
	}
	// A get answer has the same keys, plus the counters.
	get := strings.Replace(text, "replace_allowed_ips=true\n", "", 1) + "rx_bytes=7\nlast_handshake_time_sec=100\n"
	d, err := parseDevice("wg-sluice", get)
	if err != nil {
		t.Fatal(err)
	}
	if d.PrivateKey != priv || d.PublicKey != priv.PublicKey() || d.ListenPort != 51820 || len(d.Peers) != 1 {
		t.Fatalf("device: %+v", d)
	}
	p := d.Peers[0]
	if p.PublicKey != pub || p.PresharedKey != psk || p.Endpoint.String() != "[fd00::2]:51821" || p.PersistentKeepaliveInterval != ka ||
		len(p.AllowedIPs) != 1 || p.AllowedIPs[0].String() != "fd00:2::/64" || p.ReceiveBytes != 7 || p.LastHandshakeTime.Unix() != 100 {
		t.Errorf("peer: %+v", p)
	}
	if _, err := parseDevice("x", "private_key=zz\n"); err == nil {
		t.Error("a bad key was accepted")
	}
}

func TestKeyIsStableAndPrivate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "state", KeyFile)
	k1, created, err := LoadOrCreateKey(path)
	if err != nil || !created {
		t.Fatalf("first start: %v created=%v", err, created)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode: %v %v", fi.Mode(), err)
	}
	k2, created, err := LoadOrCreateKey(path)
	if err != nil || created || k2 != k1 {
		t.Errorf("restart: a different key (%v, created=%v)", err, created)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreateKey(path); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("a key readable by others was left so: %v", fi.Mode())
	}
	k3, err := RotateKey(path)
	if err != nil || k3 == k1 {
		t.Errorf("rotation: %v", err)
	}
	if k4, _, _ := LoadOrCreateKey(path); k4 != k3 {
		t.Error("rotated key not kept")
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if k5, created, _ := LoadOrCreateKey(path); !created || k5 == k3 {
		t.Error("deleting the key file did not make a new key")
	}
	if err := os.WriteFile(path, []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreateKey(path); err == nil || !strings.Contains(err.Error(), "delete it") {
		t.Errorf("a corrupt key file: %v", err)
	}
}
