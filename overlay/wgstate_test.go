package overlay

import (
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/overlay/netconf"
)

// dualStackWGLoop is a loop, without a kernel, as Run would have set it up
// on a dual-stack wireguard node.
func dualStackWGLoop(t *testing.T, mode string) *wgBackend {
	nc, err := netconf.Parse([]byte(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56",
		"Backend":{"Type":"wireguard","Mode":"` + mode + `","PersistentKeepaliveInterval":25}}`))
	if err != nil {
		t.Fatal(err)
	}
	key, _ := wgtypes.GeneratePrivateKey()
	l := &Loop{cfg: Config{NodeName: "node-1", Net: nc},
		underlay: &Underlay{Link: &netlink.Dummy{LinkAttrs: netlink.LinkAttrs{MTU: 1500}}}}
	b := &wgBackend{l: l, key: key}
	l.backend = b
	for _, f := range iptables.Families(true, true) {
		l.families = append(l.families, &family{Family: f})
	}
	l.status.Lease = []netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:10:244:1::/64")}
	return b
}

func wgNode(name, v4, v6, sub4, sub6 string, key wgtypes.Key) *corev1.Node {
	data := wireguardDataOf(key.String())
	return &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: map[string]string{
		AnnBackendType: "wireguard", AnnPublicIP: v4, AnnPublicIPv6: v6, AnnBackendData: data, AnnBackendV6Data: data}},
		Spec: corev1.NodeSpec{PodCIDRs: []string{sub4, sub6}}}
}

func TestWireGuardStateModes(t *testing.T) {
	k2, _ := wgtypes.GeneratePrivateKey()
	nodes := []*corev1.Node{
		wgNode("node-2", "192.0.2.2", "2001:db8::2", "10.244.2.0/24", "fd00:10:244:2::/64", k2.PublicKey()),
		// A VXLAN node: reported, not programmed.
		loopNode("node-3", "10.244.3.0/24", "vxlan", "192.0.2.3", true),
	}
	t.Run("separate", func(t *testing.T) {
		b := dualStackWGLoop(t, "separate")
		peers, status := b.peers(nodes)
		st := b.state(peers)
		if len(st.Devices) != 2 || st.Devices[0].Name != "wg-sluice" || st.Devices[1].Name != "wg6-sluice" || len(st.Stale) != 0 {
			t.Fatalf("devices %+v stale %v", st.Devices, st.Stale)
		}
		v4, v6 := st.Devices[0], st.Devices[1]
		if v4.ListenPort != 51820 || v6.ListenPort != 51821 || v4.MTU != 1420 || v4.Keepalive.Seconds() != 25 {
			t.Errorf("device settings: %+v / %+v", v4, v6)
		}
		if len(v4.Peers) != 1 || v4.Peers[0].Endpoint.String() != "192.0.2.2:51820" || v4.Peers[0].AllowedIPs[0].String() != "10.244.2.0/24" {
			t.Errorf("IPv4 peers %+v", v4.Peers)
		}
		if len(v6.Peers) != 1 || v6.Peers[0].Endpoint.String() != "[2001:db8::2]:51821" || v6.Peers[0].AllowedIPs[0].String() != "fd00:10:244:2::/64" {
			t.Errorf("IPv6 peers %+v", v6.Peers)
		}
		problems := 0
		for _, s := range status {
			if s.Node == "node-3" && s.Problem != "" {
				problems++
			}
		}
		if problems != 1 {
			t.Errorf("the vxlan node is not reported: %+v", status)
		}
	})
	t.Run("auto", func(t *testing.T) {
		b := dualStackWGLoop(t, "auto")
		peers, _ := b.peers(nodes)
		st := b.state(peers)
		if len(st.Devices) != 1 || st.Devices[0].Name != "wg-sluice" || len(st.Stale) != 1 || st.Stale[0] != "wg6-sluice" {
			t.Fatalf("devices %+v stale %v", st.Devices, st.Stale)
		}
		d := st.Devices[0]
		if len(d.Addrs) != 2 || len(d.Peers) != 1 || d.Peers[0].Endpoint.String() != "192.0.2.2:51820" || len(d.Peers[0].AllowedIPs) != 2 {
			t.Errorf("one tunnel for both families: %+v", d)
		}
	})
}

// FuzzWireGuardKeyOf: a peer's annotations are untrusted input; no value
// panics, and a key is returned only without a problem.
func FuzzWireGuardKeyOf(f *testing.F) {
	k, _ := wgtypes.GeneratePrivateKey()
	for _, s := range []string{wireguardDataOf(k.PublicKey().String()), `{"PublicKey":""}`, `null`, `{"PublicKey":"AAAA"}`, `{"PublicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}`, `[]`, `{"PublicKey":5}`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data string) {
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "n", Annotations: map[string]string{AnnBackendType: "wireguard", AnnBackendData: data}}}
		key, problem := wireguardKeyOf(n, false)
		if (problem == "") == (key == wgtypes.Key{}) {
			t.Fatalf("key %v with problem %q", key, problem)
		}
	})
}
