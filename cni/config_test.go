package cni

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
)

func TestParseConfErrors(t *testing.T) {
	cases := []struct {
		conf string
		code uint
		want string
	}{
		{`{`, types.ErrDecodingFailure, "not valid JSON"},
		{`[]`, types.ErrDecodingFailure, "not valid JSON"},
		{`null`, types.ErrDecodingFailure, "not valid JSON"},
		{`{"cniVersion":5}`, types.ErrInvalidNetworkConfig, "wrong type"},
		{`{"cniVersion":"1.0.0","name":"n","type":"sluice","agentTimeout":"soon"}`, types.ErrInvalidNetworkConfig, `"agentTimeout"`},
		{`{"cniVersion":"1.0.0","name":"n","type":"sluice","mtu":10}`, types.ErrInvalidNetworkConfig, `"mtu" is 10`},
		{`{"cniVersion":"1.0.0","name":"n","type":"sluice","ipam":"host-local"}`, types.ErrInvalidNetworkConfig, `"ipam" must be an object`},
		{`{"cniVersion":"1.0.0","name":"n","type":"sluice","ipam":{"type":"../evil"}}`, types.ErrInvalidNetworkConfig, `"ipam.type"`},
	}
	for _, c := range cases {
		_, err := ParseConf([]byte(c.conf))
		var e *types.Error
		if !errors.As(err, &e) || e.Code != c.code || !strings.Contains(e.Msg, c.want) {
			t.Errorf("%s: got %v, want code %d with %q", c.conf, err, c.code, c.want)
		}
	}
}

func subnets() *Subnets {
	return &Subnets{
		Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.3.0/24"),
		Network6: netip.MustParsePrefix("fd00:10:244::/56"), Subnet6: netip.MustParsePrefix("fd00:10:244:3::/64"), MTU: 1430,
	}
}

func TestIPAMSubstitution(t *testing.T) {
	cases := []struct{ conf, wantType, wantIPAM string }{
		{`{"cniVersion":"1.0.0","name":"n","type":"sluice"}`, "host-local",
			`{"ranges":[[{"subnet":"10.244.3.0/24"}],[{"subnet":"fd00:10:244:3::/64"}]],"type":"host-local"}`},
		{`{"cniVersion":"1.0.0","name":"n","type":"sluice","ipam":{"type":"host-local","subnet":"usePodCidr","dataDir":"/x"}}`, "host-local",
			`{"dataDir":"/x","ranges":[[{"subnet":"10.244.3.0/24"}],[{"subnet":"fd00:10:244:3::/64"}]],"type":"host-local"}`},
		{`{"cniVersion":"1.0.0","name":"n","type":"sluice","ipam":{"type":"host-local","ranges":[[{"subnet":"usePodCidr","gateway":"10.244.3.1"}],[{"subnet":"usePodCidrIPv6"}]]}}`, "host-local",
			`{"ranges":[[{"gateway":"10.244.3.1","subnet":"10.244.3.0/24"}],[{"subnet":"fd00:10:244:3::/64"}]],"type":"host-local"}`},
		{`{"cniVersion":"1.0.0","name":"n","type":"sluice","ipam":{"type":"static","addresses":[{"address":"10.9.9.9/24"}]}}`, "static",
			`{"addresses":[{"address":"10.9.9.9/24"}],"type":"static"}`},
	}
	for _, c := range cases {
		conf, err := ParseConf([]byte(c.conf))
		if err != nil {
			t.Fatal(err)
		}
		typ, b, err := conf.ipamConf(subnets())
		if err != nil {
			t.Fatal(err)
		}
		var full map[string]json.RawMessage
		_ = json.Unmarshal(b, &full)
		if typ != c.wantType || string(full["ipam"]) != c.wantIPAM {
			t.Errorf("%s:\n got %s %s\nwant %s %s", c.conf, typ, full["ipam"], c.wantType, c.wantIPAM)
		}
		if string(full["name"]) != `"n"` {
			t.Errorf("the network name is lost: %s", b)
		}
	}
}

func TestReadSubnets(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "subnet.env")
	_, err := ReadSubnets(path)
	var e *types.Error
	if !errors.As(err, &e) || e.Code != types.ErrTryAgainLater {
		t.Errorf("missing subnet.env: got %v, want code 11", err)
	}
	os.WriteFile(path, []byte("SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET=10.244.3.0/24\nSLUICE_MTU=1450\nSLUICE_IPMASQ=true\n"), 0o644)
	s, err := ReadSubnets(path)
	if err != nil || s.Subnet.String() != "10.244.3.0/24" || s.MTU != 1450 || !s.IPMasq || len(s.List()) != 1 {
		t.Errorf("got %+v %v", s, err)
	}
	os.WriteFile(path, []byte("SLUICE_SUBNET=banana\n"), 0o644)
	if _, err := ReadSubnets(path); err == nil || !strings.Contains(err.Error(), "SLUICE_SUBNET") {
		t.Errorf("bad subnet.env: %v", err)
	}
}

func TestHostVethName(t *testing.T) {
	a := HostVethName("default", "web", "c1")
	if len(a) != 13 || !strings.HasPrefix(a, "sl") || a != HostVethName("default", "web", "c2") {
		t.Errorf("name %q is not sl+11 hex, stable per pod", a)
	}
	if HostVethName("default", "web2", "c1") == a || HostVethName("", "", "c1") == HostVethName("", "", "c2") {
		t.Error("names collide")
	}
}

// FuzzParseConf: no configuration panics the plugin, and an accepted one
// always yields an IPAM configuration or a CNI error.
func FuzzParseConf(f *testing.F) {
	for _, s := range []string{
		`{"cniVersion":"1.0.0","name":"n","type":"sluice"}`,
		`{"cniVersion":"1.1.0","name":"n","type":"sluice","ipam":{"type":"host-local","ranges":[[{"subnet":"usePodCidr"}],[{"subnet":"usePodCidrIPv6"}]]}}`,
		`{"cniVersion":"0.3.1","name":"n","type":"sluice","mtu":1400,"agentTimeout":"3s","ipam":{"type":"host-local","subnet":"usePodCidr"}}`,
		`{"ipam":{"ranges":[1,[2],[{"subnet":null}]]}}`,
		`null`, `{"ipam":null}`, `{"cni.dev/valid-attachments":[{"containerID":"x","ifname":"eth0"}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		conf, err := ParseConf(data)
		if err != nil {
			var e *types.Error
			if !errors.As(err, &e) {
				t.Fatalf("error is not a CNI error: %v", err)
			}
			return
		}
		_, _, err = conf.ipamConf(subnets())
		if err != nil {
			var e *types.Error
			if !errors.As(err, &e) {
				t.Fatalf("ipam error is not a CNI error: %v", err)
			}
		}
	})
}

// FuzzPrevResult: a malformed prevResult (as CHECK and chained plugins get
// it) is refused with an error, never a panic.
func FuzzPrevResult(f *testing.F) {
	for _, s := range []string{
		`{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"10.244.1.2/32","interface":0}]}`,
		`{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.1.1/24"}]}`,
		`{"cniVersion":"1.0.0","ips":[{"address":"garbage","interface":-5}]}`,
		`{"cniVersion":"9.9.9"}`, `[]`, `"x"`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, prev []byte) {
		stdin := []byte(`{"cniVersion":"1.0.0","name":"n","type":"sluice","prevResult":` + string(prev) + `}`)
		conf, err := ParseConf(stdin)
		if err != nil {
			return
		}
		if err := version.ParsePrevResult(&conf.NetConf); err != nil {
			return
		}
		if conf.PrevResult != nil {
			_, _ = resultOf(conf.PrevResult)
		}
	})
}
