package overlay

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/overlay/netconf"
)

func TestChecksumOffloadDecision(t *testing.T) {
	cases := []struct {
		mode, release string
		want          bool
	}{
		{"auto", "4.19.0-21-amd64", false},
		{"auto", "5.4.0-150-generic", false},
		{"auto", "5.6.19", false},
		{"auto", "5.7.0", true},
		{"auto", "6.1.0-13-cloud-amd64", true},
		{"auto", "garbage", true},
		{"on", "4.19.0", true},
		{"off", "6.8.0", false},
	}
	for _, c := range cases {
		got, why := checksumOffloadWanted(c.mode, c.release)
		if got != c.want || why == "" {
			t.Errorf("%s on %s: got %v (%s), want %v", c.mode, c.release, got, why, c.want)
		}
	}
}

func TestVtepMACIsStableAndLocal(t *testing.T) {
	a, b := VtepMAC("node-1", false), VtepMAC("node-1", false)
	if a.String() != b.String() {
		t.Errorf("MAC not stable: %s vs %s", a, b)
	}
	if VtepMAC("node-1", true).String() == a.String() || VtepMAC("node-2", false).String() == a.String() {
		t.Error("MACs of different nodes or families collide")
	}
	if a[0]&0x01 != 0 || a[0]&0x02 == 0 {
		t.Errorf("%s is not a locally administered unicast MAC", a)
	}
}

// A flannel node's annotations, exactly as flannel v0.2x writes them, make a
// Sluice peer.
func TestPeerFromFlannelAnnotations(t *testing.T) {
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "flannel-node", Annotations: map[string]string{
			"flannel.alpha.coreos.com/backend-data":        `{"VNI":1,"VtepMAC":"9a:1e:6f:4c:2b:01"}`,
			"flannel.alpha.coreos.com/backend-type":        "vxlan",
			"flannel.alpha.coreos.com/kube-subnet-manager": "true",
			"flannel.alpha.coreos.com/public-ip":           "198.18.0.21",
		}},
		Spec: corev1.NodeSpec{PodCIDR: "10.244.5.0/24", PodCIDRs: []string{"10.244.5.0/24"}},
	}
	p, problem, ok := peerOf(n, false)
	if !ok || problem != "" || p.Subnet.String() != "10.244.5.0/24" || p.PublicIP.String() != "198.18.0.21" || p.VtepMAC.String() != "9a:1e:6f:4c:2b:01" {
		t.Fatalf("peer = %+v, %v", p, ok)
	}
	n.Annotations["flannel.alpha.coreos.com/public-ip-overwrite"] = "203.0.113.9"
	if p, _, _ := peerOf(n, false); p.PublicIP.String() != "203.0.113.9" {
		t.Errorf("public-ip-overwrite not honoured: %s", p.PublicIP)
	}
	if _, _, ok := peerOf(n, true); ok {
		t.Error("IPv6 peer from a node without IPv6")
	}
	n.Annotations["flannel.alpha.coreos.com/backend-data"] = `{"VNI":1}`
	if _, problem, ok := peerOf(n, false); !ok || !strings.Contains(problem, "without a VtepMAC") {
		t.Errorf("vxlan peer without a VtepMAC: problem %q, %v; want it reported", problem, ok)
	}
	delete(n.Annotations, "flannel.alpha.coreos.com/public-ip")
	delete(n.Annotations, "flannel.alpha.coreos.com/public-ip-overwrite")
	if _, _, ok := peerOf(n, false); ok {
		t.Error("peer without a public IP accepted")
	}
}

func TestOwnAnnotationsRoundTrip(t *testing.T) {
	mac := VtepMAC("a", false)
	ann := ownAnnotations("vxlan", netip.MustParseAddr("198.18.0.11"), netip.Addr{}, vxlanData(1, mac), vxlanData(1, nil))
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "a", Annotations: ann}, Spec: corev1.NodeSpec{PodCIDRs: []string{"10.244.1.0/24"}}}
	p, problem, ok := peerOf(n, false)
	if !ok || problem != "" || p.VtepMAC.String() != mac.String() || ann[AnnBackendData] != `{"VNI":1,"VtepMAC":"`+mac.String()+`"}` {
		t.Errorf("round trip: %+v %v %v", p, ok, ann)
	}
}

func TestSubnetEnv(t *testing.T) {
	dir := t.TempDir()
	nc, _ := netconf.Parse([]byte(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`))
	err := writeSubnetEnv(dir, nc, []netip.Prefix{netip.MustParsePrefix("10.244.3.0/24"), netip.MustParsePrefix("fd00:10:244:3::/64")}, 1430, true)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(filepath.Join(dir, "subnet.env"))
	want := "SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET=10.244.3.0/24\nSLUICE_IPV6_NETWORK=fd00:10:244::/56\nSLUICE_IPV6_SUBNET=fd00:10:244:3::/64\nSLUICE_MTU=1430\nSLUICE_IPMASQ=true\n"
	if string(b) != want {
		t.Errorf("subnet.env:\n%s\nwant:\n%s", b, want)
	}
}
