package netconf

import (
	"strings"
	"testing"
)

func TestParseDefaults(t *testing.T) {
	c, err := Parse([]byte(`{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}`))
	if err != nil {
		t.Fatal(err)
	}
	if !c.EnableIPv4 || c.EnableIPv6 || c.SubnetLen != 24 || c.Backend.VNI != 1 || c.Backend.Port != 8472 || c.Backend.MTU != 0 {
		t.Errorf("defaults not applied: %+v", c)
	}
}

func TestParseDualStackAndBackend(t *testing.T) {
	c, err := Parse([]byte(`{"Network":"10.10.0.0/16","IPv6Network":"fd00:10::/56","EnableIPv6":true,"SubnetLen":25,
		"Backend":{"Type":"VXLAN","VNI":4096,"Port":4789,"MTU":1400,"DirectRouting":true,"GBP":true}}`))
	if err != nil {
		t.Fatal(err)
	}
	if !c.EnableIPv6 || c.IPv6Network.String() != "fd00:10::/56" || c.IPv6SubnetLen != 64 || c.SubnetLen != 25 {
		t.Errorf("networks: %+v", c)
	}
	if c.Backend != (Backend{Type: "vxlan", VNI: 4096, Port: 4789, MTU: 1400, DirectRouting: true, GBP: true}) {
		t.Errorf("backend: %+v", c.Backend)
	}
	if n := c.Networks(); len(n) != 2 {
		t.Errorf("Networks() = %v", n)
	}
}

func TestParseWireGuard(t *testing.T) {
	c, err := Parse([]byte(`{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard"}}`))
	if err != nil {
		t.Fatal(err)
	}
	want := WireGuard{ListenPort: 51820, ListenPortV6: 51821, Mode: "separate", Implementation: "auto"}
	if c.Backend.Type != BackendWireGuard || c.Backend.WireGuard != want {
		t.Errorf("wireguard defaults: %+v", c.Backend)
	}
	psk := "GYtRqJ1v0C3Vg9v7Yb1xJm0kq0n6cGx7aN1q3mC0WlE="
	c, err = Parse([]byte(`{"Network": "10.244.0.0/16", "IPv6Network": "fd00::/56", "EnableIPv6": true, "Backend": {"Type": "WireGuard",
		"PSK": "` + psk + `", "ListenPort": 4000, "ListenPortV6": 4001, "PersistentKeepaliveInterval": 25, "Mode": "Auto", "Implementation": "userspace"}}`))
	if err != nil {
		t.Fatal(err)
	}
	want = WireGuard{PSK: psk, ListenPort: 4000, ListenPortV6: 4001, PersistentKeepaliveInterval: 25, Mode: "auto", Implementation: "userspace"}
	if c.Backend.WireGuard != want {
		t.Errorf("wireguard fields: %+v", c.Backend.WireGuard)
	}
	// One tunnel for both families may share a port.
	if _, err := Parse([]byte(`{"Network": "10.244.0.0/16", "IPv6Network": "fd00::/56", "EnableIPv6": true,
		"Backend": {"Type": "wireguard", "Mode": "auto", "ListenPort": 4000, "ListenPortV6": 4000}}`)); err != nil {
		t.Errorf("auto mode with one port refused: %v", err)
	}
}

func TestParseIPv6Only(t *testing.T) {
	c, err := Parse([]byte(`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10::/48"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.EnableIPv4 || len(c.Networks()) != 1 {
		t.Errorf("IPv6-only: %+v", c)
	}
}

// Each bad value must be refused with a message naming the field and the
// fix.
func TestParseErrors(t *testing.T) {
	cases := []struct{ conf, field, fix string }{
		{`{`, "not valid JSON", ""},
		{`{"Network": 5}`, "Network", "must be a string"},
		{`{}`, `"Network": is missing`, "--pod-network-cidr"},
		{`{"Network": "10.244.0.0/33"}`, `"Network" is "10.244.0.0/33": is not a CIDR`, "10.244.0.0/16"},
		{`{"Network": "10.244.1.0/16"}`, "host bits", `did you mean "10.244.0.0/16"`},
		{`{"Network": "fd00::/48"}`, "must be an IPv4 CIDR", ""},
		{`{"Network": "10.244.0.0/16", "SubnetLen": 8}`, `"SubnetLen" is 8`, "use 24"},
		{`{"Network": "10.244.0.0/16", "SubnetLen": 31}`, `"SubnetLen" is 31`, ""},
		{`{"Network": "10.244.0.0/16", "EnableIPv6": true}`, `"IPv6Network": is missing`, "EnableIPv6"},
		{`{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "10.0.0.0/8"}`, "must be an IPv6 CIDR", ""},
		{`{"EnableIPv4": false}`, "no address family", ""},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "ipsec"}}`, "does not support", `"wireguard"`},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "PSK": "x"}}`, "does not take the wireguard fields", `"Type": "wireguard"`},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "PSK": "bm90IGEga2V5"}}`, `"Backend.PSK"`, "wg genpsk"},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "ListenPort": 65536}}`, `"Backend.ListenPort" is 65536`, "51820"},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "ListenPortV6": -1}}`, `"Backend.ListenPortV6" is -1`, "51821"},
		{`{"Network": "10.244.0.0/16", "IPv6Network": "fd00::/56", "EnableIPv6": true, "Backend": {"Type": "wireguard", "ListenPort": 5000, "ListenPortV6": 5000}}`, "equals ListenPort", `"Mode": "auto"`},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "PersistentKeepaliveInterval": 70000}}`, `"Backend.PersistentKeepaliveInterval"`, "25"},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "Mode": "both"}}`, `"Backend.Mode" is "both"`, `"separate"`},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "Implementation": "boringtun"}}`, `"Backend.Implementation" is "boringtun"`, `"userspace"`},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "DirectRouting": true}}`, "only apply to the vxlan backend", ""},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "wireguard", "MTU": 100}}`, `"Backend.MTU"`, "leave it out"},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "bogus"}}`, `"Backend.Type" is "bogus"`, `"host-gw"`},
		{`{"Network": "10.244.0.0/16", "Backend": {"VNI": 16777216}}`, `"Backend.VNI"`, "default is 1"},
		{`{"Network": "10.244.0.0/16", "Backend": {"VNI": -1}}`, `"Backend.VNI"`, ""},
		{`{"Network": "10.244.0.0/16", "Backend": {"Port": 70000}}`, `"Backend.Port"`, "8472"},
		{`{"Network": "10.244.0.0/16", "Backend": {"MTU": 100}}`, `"Backend.MTU"`, "leave it out"},
		{`{"Network": "10.244.0.0/16", "Backend": {"Type": "host-gw", "DirectRouting": true}}`, "DirectRouting", ""},
		{`{"Network": "10.244.0.0/16"} {}`, "after its closing brace", ""},
	}
	for _, c := range cases {
		_, err := Parse([]byte(c.conf))
		if err == nil {
			t.Errorf("%s: accepted", c.conf)
			continue
		}
		if !strings.Contains(err.Error(), c.field) || !strings.Contains(err.Error(), c.fix) {
			t.Errorf("%s: error %q does not mention %q and %q", c.conf, err, c.field, c.fix)
		}
	}
}

// FuzzParse: no input panics, and whatever is accepted is consistent.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		`{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}`,
		`{"Network":"10.10.0.0/16","IPv6Network":"fd00:10::/56","EnableIPv6":true,"Backend":{"Type":"host-gw"}}`,
		`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/8","IPv6SubnetLen":120}`,
		`{"Network":"0.0.0.0/0","SubnetLen":30,"Backend":{"VNI":16777215,"Port":1,"MTU":65535}}`,
		`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","Mode":"auto","Implementation":"userspace","ListenPort":1}}`,
		`[]`, `null`, `{"Backend":null}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse(data)
		if err != nil {
			if c != nil {
				t.Fatal("config returned with an error")
			}
			return
		}
		if !c.EnableIPv4 && !c.EnableIPv6 {
			t.Fatal("accepted with no family")
		}
		if c.EnableIPv4 && (!c.Network.Addr().Is4() || c.SubnetLen <= c.Network.Bits() || c.SubnetLen > 30) {
			t.Fatalf("bad IPv4 config accepted: %+v", c)
		}
		if c.EnableIPv6 && (!c.IPv6Network.Addr().Is6() || c.IPv6SubnetLen <= c.IPv6Network.Bits()) {
			t.Fatalf("bad IPv6 config accepted: %+v", c)
		}
		if c.Backend.VNI < 1 || c.Backend.Port < 1 || c.Backend.Port > 65535 {
			t.Fatalf("bad backend accepted: %+v", c.Backend)
		}
		if w := c.Backend.WireGuard; c.Backend.Type == BackendWireGuard &&
			(w.ListenPort < 1 || w.ListenPort > 65535 || w.ListenPortV6 < 1 || w.ListenPortV6 > 65535 || w.Mode == "" || w.Implementation == "") {
			t.Fatalf("bad wireguard backend accepted: %+v", w)
		} else if c.Backend.Type != BackendWireGuard && w != (WireGuard{}) {
			t.Fatalf("wireguard fields on a %s backend: %+v", c.Backend.Type, w)
		}
	})
}
