package overlay

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	corev1 "k8s.io/api/core/v1"

	"github.com/sluice-net/sluice/overlay/netconf"
	"github.com/sluice-net/sluice/overlay/vxlan"
)

// Node annotations in flannel's format: a flannel node reads Sluice's and
// Sluice reads flannel's, so both kinds of node reach each other's pods.
const (
	annotationPrefix       = "flannel.alpha.coreos.com/"
	AnnBackendType         = annotationPrefix + "backend-type"
	AnnBackendData         = annotationPrefix + "backend-data"
	AnnBackendV6Data       = annotationPrefix + "backend-v6-data"
	AnnPublicIP            = annotationPrefix + "public-ip"
	AnnPublicIPv6          = annotationPrefix + "public-ipv6"
	AnnPublicIPOverwrite   = annotationPrefix + "public-ip-overwrite"
	AnnPublicIPv6Overwrite = annotationPrefix + "public-ipv6-overwrite"
	AnnKubeSubnetManager   = annotationPrefix + "kube-subnet-manager"
)

// backendData is flannel's vxlan backend-data.
type backendData struct {
	VNI     int    `json:"VNI"`
	VtepMAC string `json:"VtepMAC"`
}

// VtepMAC derives the node's VTEP MAC from its name and family, so it is
// the same after every restart, even with all local state lost. It is a
// locally administered unicast address.
func VtepMAC(node string, ipv6 bool) net.HardwareAddr {
	h := sha256.Sum256([]byte(fmt.Sprintf("sluice-vtep/%s/%v", node, ipv6)))
	mac := net.HardwareAddr(h[:6])
	mac[0] = (mac[0] &^ 0x01) | 0x02
	return mac
}

// wireguardData is flannel's wireguard backend-data: the node's public
// key, the same in both families' annotations.
type wireguardData struct {
	PublicKey string `json:"PublicKey"`
}

// vxlanData renders a vxlan backend-data; a nil MAC (host-gw) is "null".
func vxlanData(vni int, mac net.HardwareAddr) string {
	if mac == nil {
		return "null"
	}
	b, _ := json.Marshal(backendData{VNI: vni, VtepMAC: mac.String()})
	return string(b)
}

// wireguardDataOf renders a wireguard backend-data.
func wireguardDataOf(publicKey string) string {
	b, _ := json.Marshal(wireguardData{PublicKey: publicKey})
	return string(b)
}

// ownAnnotations are the annotations this node publishes, with each
// family's backend-data already rendered.
func ownAnnotations(backend string, publicIP4, publicIP6 netip.Addr, data4, data6 string) map[string]string {
	a := map[string]string{
		AnnBackendType:       backend,
		AnnKubeSubnetManager: "true",
	}
	if publicIP4.IsValid() {
		a[AnnPublicIP] = publicIP4.String()
		a[AnnBackendData] = data4
	}
	if publicIP6.IsValid() {
		a[AnnPublicIPv6] = publicIP6.String()
		a[AnnBackendV6Data] = data6
	}
	return a
}

// wireguardKeyOf reads a wireguard node's public key from one family's
// backend-data. A node of another backend has none: no tunnel reaches it.
func wireguardKeyOf(n *corev1.Node, ipv6 bool) (wgtypes.Key, string) {
	dataKey := AnnBackendData
	if ipv6 {
		dataKey = AnnBackendV6Data
	}
	if t := n.Annotations[AnnBackendType]; t != netconf.BackendWireGuard {
		return wgtypes.Key{}, fmt.Sprintf("node's backend is %q, not wireguard, so no encrypted tunnel reaches it (switch every node's backend, see the README)", t)
	}
	var d wireguardData
	if err := json.Unmarshal([]byte(n.Annotations[dataKey]), &d); err != nil || d.PublicKey == "" {
		return wgtypes.Key{}, fmt.Sprintf("wireguard node without a PublicKey in annotation %s=%q", dataKey, n.Annotations[dataKey])
	}
	k, err := wgtypes.ParseKey(d.PublicKey)
	if err != nil || k == (wgtypes.Key{}) {
		return wgtypes.Key{}, fmt.Sprintf("bad PublicKey %q in annotation %s", d.PublicKey, dataKey)
	}
	return k, ""
}

// peerOf reads a remote node's subnet and tunnel endpoint of one family. It
// returns false for a node that does not publish them yet (its agent has
// not started); that node is added when it does. A node whose annotations
// cannot be used is returned with the problem, so the caller reports it
// instead of programming it.
func peerOf(n *corev1.Node, ipv6 bool) (vxlan.Peer, string, bool) {
	var subnet netip.Prefix
	for _, c := range n.Spec.PodCIDRs {
		if p, err := netip.ParsePrefix(c); err == nil && p.Addr().Is6() == ipv6 {
			subnet = p
			break
		}
	}
	if !subnet.IsValid() && n.Spec.PodCIDR != "" {
		if p, err := netip.ParsePrefix(n.Spec.PodCIDR); err == nil && p.Addr().Is6() == ipv6 {
			subnet = p
		}
	}
	if !subnet.IsValid() {
		return vxlan.Peer{}, "", false
	}
	ipKey, overwriteKey, dataKey := AnnPublicIP, AnnPublicIPOverwrite, AnnBackendData
	if ipv6 {
		ipKey, overwriteKey, dataKey = AnnPublicIPv6, AnnPublicIPv6Overwrite, AnnBackendV6Data
	}
	ipStr, key := n.Annotations[overwriteKey], overwriteKey
	if ipStr == "" {
		ipStr, key = n.Annotations[ipKey], ipKey
	}
	if ipStr == "" {
		return vxlan.Peer{}, "", false
	}
	p := vxlan.Peer{Node: n.Name, Subnet: subnet}
	ip, err := netip.ParseAddr(ipStr)
	if err != nil || ip.Is6() != ipv6 {
		return p, fmt.Sprintf("annotation %s=%q is not an %s address", key, ipStr, familyName(ipv6)), true
	}
	p.PublicIP = ip
	if n.Annotations[AnnBackendType] == netconf.BackendVXLAN {
		var d backendData
		if err := json.Unmarshal([]byte(n.Annotations[dataKey]), &d); err != nil || d.VtepMAC == "" {
			return p, fmt.Sprintf("vxlan node without a VtepMAC in annotation %s=%q", dataKey, n.Annotations[dataKey]), true
		}
		mac, err := net.ParseMAC(d.VtepMAC)
		if err != nil {
			return p, fmt.Sprintf("bad VtepMAC %q in annotation %s", d.VtepMAC, dataKey), true
		}
		p.VtepMAC = mac
	}
	return p, "", true
}
