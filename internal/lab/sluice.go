package lab

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"github.com/sluice-net/sluice/manifests"
)

// CNI modes of a lab.
const (
	// CNISluice installs Sluice from manifests/sluice.yaml (embedded in
	// sluicectl) once the nodes are Ready, and lab up returns when its
	// agents have the network up on every node. The lab kubelets run the
	// DaemonSet's pods as in CNIManifest.
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

// RunsSluiceImage reports whether the lab's kubelets run pods of Sluice's
// image as processes.
func (s *State) RunsSluiceImage() bool { return s.CNI == CNISluice || s.CNI == CNIManifest }

// Sluice's binaries live next to sluicectl.
func (s *State) sluiceBin(name string) string {
	return filepath.Join(filepath.Dir(s.Sluicectl), name)
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

// AgentDisabledPath is a file that, while it exists, keeps the node's
// kubelet from (re)starting the containers of Sluice's pod, so tests can
// hold an agent down.
func (n Node) AgentDisabledPath() string { return filepath.Join(n.Dir, "agent.disabled") }

// installManifest applies the embedded manifest, as an operator would after
// setting net-conf.json to the cluster's pod networks: on a dual-stack lab
// it adds the IPv6 network, and it sets the lab's backend.
func (s *State) installManifest(ctx context.Context) error {
	m := manifests.Sluice
	if conf, changed := s.netConf(); changed {
		var err error
		if m, err = withNetConf(m, conf); err != nil {
			return err
		}
	}
	// The ClusterNetworkPolicy CRD first, as an operator following the
	// README would: the agents then list the policies at start.
	for _, doc := range []struct {
		name string
		body []byte
	}{{"ClusterNetworkPolicy CRD", manifests.ClusterNetworkPolicyCRDs}, {"sluice manifest", m}} {
		cmd := exec.CommandContext(ctx, KubectlPath(s.ToolsDir), "--kubeconfig", s.AdminKubeconfig(), "apply", "-f", "-")
		cmd.Stdin = bytes.NewReader(doc.body)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("kubectl apply of the %s: %w: %s", doc.name, err, out)
		}
	}
	return nil
}

// netConf is the lab's net-conf.json, and whether it differs from the
// manifest's (IPv4 with vxlan).
func (s *State) netConf() (string, bool) {
	backend := s.Backend
	if backend == "" {
		backend = "vxlan"
	}
	if s.IPv6 {
		return fmt.Sprintf(`{"Network": %q, "EnableIPv6": true, "IPv6Network": %q, "Backend": {"Type": %q}}`, s.ClusterCIDR, clusterCIDR6, backend), true
	}
	return fmt.Sprintf(`{"Network": %q, "Backend": {"Type": %q}}`, s.ClusterCIDR, backend), backend != "vxlan"
}

// withNetConf replaces net-conf.json in the manifest's ConfigMap.
func withNetConf(manifest []byte, conf string) ([]byte, error) {
	docs := strings.Split(string(manifest), "\n---\n")
	for i, doc := range docs {
		var cm corev1.ConfigMap
		if err := yaml.Unmarshal([]byte(doc), &cm); err != nil {
			return nil, fmt.Errorf("reading the sluice manifest: %w", err)
		}
		if cm.Kind != "ConfigMap" || cm.Name != "sluice" {
			continue
		}
		cm.Data["net-conf.json"] = conf
		b, err := yaml.Marshal(&cm)
		if err != nil {
			return nil, err
		}
		docs[i] = string(b)
		return []byte(strings.Join(docs, "\n---\n")), nil
	}
	return nil, fmt.Errorf("the sluice manifest has no ConfigMap sluice")
}

func sluiceReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeNetworkUnavailable {
			return c.Status == corev1.ConditionFalse && c.Reason == "SluiceIsUp"
		}
	}
	return false
}
