package lab

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/klog/v2"
)

// CNI modes of a lab.
const (
	// CNISluice installs Sluice on every node: `sluice install` puts the
	// plugins and 10-sluice.conflist in the node's CNI dirs, and sluiced
	// runs on the node.
	CNISluice = "sluice"
	// CNIReference writes a ptp + host-local conflist once a node has its
	// podCIDR: pods on one node reach each other, nothing more.
	CNIReference = "reference"
	// CNINone leaves the nodes' CNI dirs empty for an installer.
	CNINone = "none"
	// CNIManifest stages Sluice's image for the lab kubelets, which then
	// run the pods of manifests/sluice.yaml's DaemonSet as processes once
	// it is applied: the install init container, then sluiced with the
	// manifest's ServiceAccount, configuration and probes.
	CNIManifest = "manifest"
)

// Sluice's binaries live next to sluicectl.
func (s *State) sluiceBin(name string) string {
	return filepath.Join(filepath.Dir(s.Sluicectl), name)
}

// NetConfPath is the net-conf.json the lab's agents use.
func (s *State) NetConfPath() string { return s.Path("net-conf.json") }

// stageSluice copies what `sluice install` installs into one directory, as
// the DaemonSet's image would hold it, and writes the lab's net-conf.json.
func (s *State) stageSluice() error {
	stage := s.Path("stage")
	if err := os.MkdirAll(stage, 0o755); err != nil {
		return err
	}
	if err := copyFile(s.sluiceBin("sluice"), filepath.Join(stage, "sluice"), 0o755); err != nil {
		return fmt.Errorf("%w (build it with 'make build'; sluice and sluiced must sit next to sluicectl)", err)
	}
	for _, p := range []string{"host-local", "portmap", "bandwidth", "loopback"} {
		if err := copyFile(filepath.Join(CNIToolsPath(s.ToolsDir), p), filepath.Join(stage, p), 0o755); err != nil {
			return err
		}
	}
	conf := fmt.Sprintf(`{"Network": %q, "Backend": {"Type": "vxlan"}}`, s.ClusterCIDR)
	if s.IPv6 {
		conf = fmt.Sprintf(`{"Network": %q, "EnableIPv6": true, "IPv6Network": %q, "Backend": {"Type": "vxlan"}}`, s.ClusterCIDR, clusterCIDR6)
	}
	return WriteFileAtomic(s.NetConfPath(), []byte(conf+"\n"), 0o644)
}

// ImageDir is the staged filesystem of Sluice's image: what the Dockerfile
// copies to /opt/sluice/bin.
func (s *State) ImageDir() string { return s.Path("image") }

// stageImage lays out the image for the lab kubelets.
func (s *State) stageImage() error {
	bin := filepath.Join(s.ImageDir(), "opt", "sluice", "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return err
	}
	for _, name := range []string{"sluice", "sluiced"} {
		if err := copyFile(s.sluiceBin(name), filepath.Join(bin, name), 0o755); err != nil {
			return fmt.Errorf("%w (build it with 'make build'; sluice and sluiced must sit next to sluicectl)", err)
		}
	}
	for _, p := range []string{"host-local", "portmap", "bandwidth", "loopback"} {
		if err := copyFile(filepath.Join(CNIToolsPath(s.ToolsDir), p), filepath.Join(bin, p), 0o755); err != nil {
			return err
		}
	}
	return nil
}

// AgentDisabledPath is a file that, while it exists, keeps the lab from
// (re)starting sluiced on a node, so tests can hold an agent down.
func (n Node) AgentDisabledPath() string { return filepath.Join(n.Dir, "agent.disabled") }

// installSluice runs `sluice install` in the node's namespaces.
func (s *State) installSluice(ctx context.Context, n Node) error {
	pid := n.KubeletPID()
	if !processAlive(pid) {
		return fmt.Errorf("node %s has no kubelet yet", n.Name)
	}
	place := Place{NetNSPath: netnsPath(n.NetNS), MountPID: pid}
	out, err := place.Command(filepath.Join(s.Path("stage"), "sluice"), "install", "--src-bin-dir", s.Path("stage"),
		"--cni-bin-dir", "/opt/cni/bin", "--cni-conf-dir", "/etc/cni/net.d", "--token-file", "").CombinedOutput()
	if err != nil {
		return fmt.Errorf("sluice install on %s: %v: %s", n.Name, err, out)
	}
	klog.InfoS("sluice installed", "node", n.Name)
	return nil
}

func (s *State) agentComponent(n Node) component {
	c := component{name: "sluiced-" + n.Name, netns: n.NetNS, mountOf: &n, args: []string{
		s.sluiceBin("sluiced"), "--kubeconfig", s.NodeKubeconfigAdmin(), "--node-name", n.Name,
		"--net-conf", s.NetConfPath(), "--health-addr", "127.0.0.1:9098",
	}}
	if v := os.Getenv("SLUICE_LAB_AGENT_V"); v != "" {
		// Log verbosity of the lab's agents, for debugging.
		c.args = append(c.args, "-v="+v)
	}
	if s.NoPodCIDR {
		// The lab knows its controller-manager allocates nothing.
		c.args = append(c.args, "--pod-cidr-wait=0s")
	}
	return c
}

func sluiceReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeNetworkUnavailable {
			return c.Status == corev1.ConditionFalse && c.Reason == "SluiceIsUp"
		}
	}
	return false
}
