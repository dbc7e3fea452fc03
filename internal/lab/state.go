// Package lab runs a real multi-node Kubernetes cluster inside network
// namespaces on one machine: etcd, kube-apiserver, kube-controller-manager and
// kube-scheduler in a control-plane namespace, and N node namespaces on a
// shared underlay bridge, each with a lab kubelet that wires pods through CNI.
//
// Nothing in the root network namespace changes. Everything the lab creates is
// recorded in one lab directory before it is created, so Down can remove it
// even after the lab's processes crashed.
package lab

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"

	"github.com/sluice-net/sluice/internal/atomicfile"
)

// Addressing of the underlay. 198.18.0.0/15 is reserved for benchmarking
// (RFC 2544) and never leaves the lab's namespaces.
const (
	UnderlayCIDR4   = "198.18.0.0/24"
	UnderlayCIDR6   = "fd00:198:18::/64"
	controlPlaneIP4 = "198.18.0.2"
	controlPlaneIP6 = "fd00:198:18::2"
	externalIP4     = "198.18.0.254"
	externalIP6     = "fd00:198:18::fe"
	firstNodeHost   = 11
	apiServerPort   = 6443
	// ExternalPort is where the outside-world host answers TCP and UDP with
	// the source address it saw, so tests can check masquerade.
	ExternalPort = 8080

	DefaultClusterCIDR  = "10.244.0.0/16"
	DefaultServiceCIDR  = "10.96.0.0/12"
	clusterCIDR6        = "fd00:10:244::/56"
	serviceCIDR6        = "fd00:10:96::/112"
	stateFileName       = "lab.json"
	readyFileName       = "ready"
	daemonPidFileName   = "daemon.pid"
	maxNodes            = 200
	kubernetesToolsName = "k8s-v1.36.3"
	kubeletToolsName    = "k8s-node-v1.36.3"
	cniToolsName        = "cni-v1.10.0"
)

// Node describes one lab node.
type Node struct {
	Name  string `json:"name"`
	NetNS string `json:"netns"`
	IP4   string `json:"ip4"`
	IP6   string `json:"ip6,omitempty"`
	// Dir holds the node's private host paths (etc/cni/net.d, opt/cni/bin,
	// run, var/lib), bind-mounted over the real ones in the node's mount
	// namespace.
	Dir string `json:"dir"`
}

// State is everything a lab is made of. It is written before any of it is
// created so that Down never has to guess.
type State struct {
	Name          string   `json:"name"`
	Dir           string   `json:"dir"`
	ID            string   `json:"id"`
	IPv6          bool     `json:"ipv6"`
	NoPodCIDR     bool     `json:"noPodCIDR"`
	ClusterCIDR   string   `json:"clusterCIDR"`
	CNI           string   `json:"cni"`
	ToolsDir      string   `json:"toolsDir"`
	Sluicectl     string   `json:"sluicectl"`
	UnderlayNS    string   `json:"underlayNetns"`
	ControlNS     string   `json:"controlPlaneNetns"`
	ExternalNS    string   `json:"externalNetns"`
	Nodes         []Node   `json:"nodes"`
	NetNSes       []string `json:"netnses"`
	APIProxyPort  int      `json:"apiProxyPort,omitempty"`
	ControlIP4    string   `json:"controlPlaneIP4"`
	ControlIP6    string   `json:"controlPlaneIP6,omitempty"`
	ExternalIP4   string   `json:"externalIP4"`
	ExternalIP6   string   `json:"externalIP6,omitempty"`
	KubeconfigOut string   `json:"adminKubeconfig"`
	// Runtime is RuntimeLab (the lab kubelet) or RuntimeContainerd (the
	// real kubelet and containerd on every node).
	Runtime string `json:"runtime,omitempty"`
	// Backend is the overlay backend of Sluice's manifest (vxlan, host-gw,
	// wireguard); empty is vxlan.
	Backend string `json:"backend,omitempty"`
	// CgroupName, on real nodes, is the cgroup (in every hierarchy) under
	// which the kubelets put their pods: /CgroupName/NODE.
	CgroupName string `json:"cgroupName,omitempty"`
	// ProxyMode is kube-proxy's mode on real nodes: ProxyIPTables,
	// ProxyNFTables or ProxyNone (no kube-proxy and no CoreDNS).
	ProxyMode string `json:"proxyMode,omitempty"`
	// ProxyBackend is the iptables backend of kube-proxy's image in
	// iptables mode: ProxyBackendNFT or ProxyBackendLegacy.
	ProxyBackend string `json:"proxyBackend,omitempty"`
}

// Runtimes of a lab's nodes.
const (
	// RuntimeLab runs the lab kubelet, a stand-in that calls the CNI
	// conflist itself and runs Sluice's image as processes.
	RuntimeLab = "lab"
	// RuntimeContainerd runs the real kubelet and containerd on every
	// node, with images built by test/tools/images.sh.
	RuntimeContainerd = "containerd"
)

// RealNodes reports whether the lab's nodes run the real kubelet and
// containerd.
func (s *State) RealNodes() bool { return s.Runtime == RuntimeContainerd }

// DefaultRoot is where labs live unless SLUICE_LAB_ROOT says otherwise. It
// must not be under a path that nodes bind over (/run, /var/lib, /opt,
// /etc/cni), or nodes could not see their own lab directory.
func DefaultRoot() string {
	if r := os.Getenv("SLUICE_LAB_ROOT"); r != "" {
		return r
	}
	return "/tmp/sluice-lab"
}

// DirFor returns the lab directory of the named lab.
func DirFor(name string) string { return filepath.Join(DefaultRoot(), name) }

// ErrNoLab means the lab directory holds no lab.
var ErrNoLab = errors.New("no lab here (run 'sluicectl lab up' first)")

// Load reads the state of the lab in dir.
func Load(dir string) (*State, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFileName))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("lab %s: %w", dir, ErrNoLab)
	}
	if err != nil {
		return nil, fmt.Errorf("reading lab state: %w", err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("parsing lab state %s: %w", filepath.Join(dir, stateFileName), err)
	}
	return &s, nil
}

// Save writes the state atomically.
func (s *State) Save() error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return WriteFileAtomic(filepath.Join(s.Dir, stateFileName), b, 0o644)
}

// Node returns the node of that name.
func (s *State) Node(name string) (*Node, bool) {
	for i := range s.Nodes {
		if s.Nodes[i].Name == name {
			return &s.Nodes[i], true
		}
	}
	return nil, false
}

// Path joins elements under the lab directory.
func (s *State) Path(elem ...string) string {
	return filepath.Join(append([]string{s.Dir}, elem...)...)
}

// AdminKubeconfig is the kubeconfig for use from the root namespace, through
// the lab's API proxy on loopback.
func (s *State) AdminKubeconfig() string { return s.Path("kubeconfig") }

// NodeKubeconfigAdmin is an admin kubeconfig that reaches the API server at
// its underlay address, for use from inside node namespaces.
func (s *State) NodeKubeconfigAdmin() string { return s.Path("pki", "admin-underlay.kubeconfig") }

// APIServerURL is the API server's address on the underlay.
func (s *State) APIServerURL() string {
	return fmt.Sprintf("https://%s:%d", s.ControlIP4, apiServerPort)
}

func nodeAddrs(i int, ipv6 bool) (string, string) {
	a4 := netip.MustParseAddr("198.18.0.0").As4()
	a4[3] = byte(firstNodeHost + i)
	v4 := netip.AddrFrom4(a4).String()
	if !ipv6 {
		return v4, ""
	}
	a6 := netip.MustParseAddr("fd00:198:18::").As16()
	a6[15] = byte(firstNodeHost + i)
	return v4, netip.AddrFrom16(a6).String()
}

// WriteFileAtomic writes a file so readers never see it half-written.
func WriteFileAtomic(path string, data []byte, mode os.FileMode) error {
	return atomicfile.Write(path, data, mode)
}
