package lab

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/sluice-net/sluice/manifests"
	"github.com/sluice-net/sluice/overlay/netconf"
)

// TestWithNetConfChangesOnlyNetConf: a dual-stack lab applies the shipped
// manifest with only net-conf.json changed.
func TestWithNetConfChangesOnlyNetConf(t *testing.T) {
	const conf = `{"Network": "10.244.0.0/16", "EnableIPv6": true, "IPv6Network": "fd00:10:244::/56"}`
	out, err := withNetConf(manifests.Sluice, conf)
	if err != nil {
		t.Fatal(err)
	}
	before := strings.Split(string(manifests.Sluice), "\n---\n")
	after := strings.Split(string(out), "\n---\n")
	if len(before) != len(after) {
		t.Fatalf("%d documents became %d", len(before), len(after))
	}
	changed := 0
	for i := range before {
		if before[i] == after[i] {
			continue
		}
		changed++
		var was, is corev1.ConfigMap
		if err := yaml.Unmarshal([]byte(before[i]), &was); err != nil {
			t.Fatal(err)
		}
		if err := yaml.Unmarshal([]byte(after[i]), &is); err != nil {
			t.Fatal(err)
		}
		if is.Kind != "ConfigMap" || is.Data["net-conf.json"] != conf || is.Data["cni-conflist.json"] != was.Data["cni-conflist.json"] {
			t.Errorf("document %d changed beyond net-conf.json:\n%s", i, after[i])
		}
	}
	if changed != 1 {
		t.Errorf("%d documents changed, want the ConfigMap only", changed)
	}
}

// The lab's backend lands in net-conf.json, and the result is a valid one.
func TestNetConfCarriesTheBackend(t *testing.T) {
	for _, c := range []struct {
		s       State
		changed bool
	}{
		{State{ClusterCIDR: DefaultClusterCIDR}, false},
		{State{ClusterCIDR: DefaultClusterCIDR, Backend: "vxlan"}, false},
		{State{ClusterCIDR: DefaultClusterCIDR, Backend: "wireguard"}, true},
		{State{ClusterCIDR: DefaultClusterCIDR, Backend: "host-gw", IPv6: true}, true},
	} {
		conf, changed := c.s.netConf()
		nc, err := netconf.Parse([]byte(conf))
		if err != nil || changed != c.changed {
			t.Errorf("%+v: %s changed=%v: %v", c.s, conf, changed, err)
			continue
		}
		want := c.s.Backend
		if want == "" {
			want = "vxlan"
		}
		if nc.Backend.Type != want || nc.EnableIPv6 != c.s.IPv6 {
			t.Errorf("%+v: %s", c.s, conf)
		}
	}
}
