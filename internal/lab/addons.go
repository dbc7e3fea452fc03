package lab

import (
	"bytes"
	"context"
	"embed"
	"fmt"
	"os/exec"
	"text/template"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// The cluster add-ons of real nodes, as kubeadm installs them at init:
// kube-proxy (a hostNetwork DaemonSet, so it runs before any pod network
// exists) and CoreDNS (a Deployment that waits for one).

// Proxy modes (--proxy-mode).
const (
	ProxyIPTables = "iptables"
	ProxyNFTables = "nftables"
	ProxyNone     = "none"
)

// iptables backends of the kube-proxy image (--proxy-iptables).
const (
	ProxyBackendNFT    = "nft"
	ProxyBackendLegacy = "legacy"
)

// Images of the add-ons, built by test/tools/images.sh.
const (
	KubeProxyImage       = "registry.k8s.io/kube-proxy:v1.36.3"
	KubeProxyLegacyImage = "registry.k8s.io/kube-proxy:v1.36.3-iptables-legacy"
	CoreDNSImage         = "registry.k8s.io/coredns/coredns:v1.15.0"
	// DNSServiceIP is kube-dns's ClusterIP, the tenth address of the
	// service range as kubeadm picks it, and the kubelets' --cluster-dns.
	DNSServiceIP = "10.96.0.10"
	// ClusterDomain is the kubelets' --cluster-domain.
	ClusterDomain = "cluster.local"
)

// Names of the add-ons' objects in kube-system.
const (
	KubeProxyDaemonSet = "kube-proxy"
	CoreDNSDeployment  = "coredns"
)

//go:embed addons/*.yaml
var addonFiles embed.FS

// RunsKubeProxy reports whether the lab's nodes run kube-proxy.
func (s *State) RunsKubeProxy() bool { return s.RealNodes() && s.ProxyMode != ProxyNone }

// kubeProxyImage is the image of the chosen iptables backend.
func (s *State) kubeProxyImage() string {
	if s.ProxyBackend == ProxyBackendLegacy {
		return KubeProxyLegacyImage
	}
	return KubeProxyImage
}

// addonManifests renders the add-ons' manifests for this lab.
func (s *State) addonManifests() ([]byte, error) {
	cidr := s.ClusterCIDR
	if s.IPv6 {
		cidr += "," + clusterCIDR6
	}
	values := map[string]map[string]string{
		"kube-proxy.yaml": {"Mode": s.ProxyMode, "ClusterCIDR": cidr, "APIServer": s.APIServerURL(), "Image": s.kubeProxyImage()},
		"coredns.yaml":    {"Image": CoreDNSImage, "ClusterIP": DNSServiceIP},
	}
	var out bytes.Buffer
	for _, name := range []string{"kube-proxy.yaml", "coredns.yaml"} {
		t, err := template.ParseFS(addonFiles, "addons/"+name)
		if err != nil {
			return nil, fmt.Errorf("reading add-on %s: %w", name, err)
		}
		t.Option("missingkey=error")
		out.WriteString("---\n")
		if err := t.Execute(&out, values[name]); err != nil {
			return nil, fmt.Errorf("rendering add-on %s: %w", name, err)
		}
	}
	return out.Bytes(), nil
}

// applyAddons applies kube-proxy and CoreDNS with kubectl, as an operator's
// kubeadm would.
func (s *State) applyAddons(ctx context.Context) error {
	m, err := s.addonManifests()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, KubectlPath(s.ToolsDir), "--kubeconfig", s.AdminKubeconfig(), "apply", "-f", "-")
	cmd.Stdin = bytes.NewReader(m)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("kubectl apply of the cluster add-ons: %w: %s", err, out)
	}
	return nil
}

// WaitAddonsReady waits until kube-proxy runs Ready on every node and, when
// withDNS, CoreDNS has all its replicas available.
func (s *State) WaitAddonsReady(ctx context.Context, withDNS bool) error {
	if !s.RunsKubeProxy() {
		return nil
	}
	cs, err := s.Client()
	if err != nil {
		return err
	}
	var last string
	for {
		last, err = s.addonProgress(ctx, cs, withDNS)
		if err == nil && last == "" {
			return nil
		}
		if err != nil {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster add-ons not ready (%s): %w", last, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// addonProgress returns what the add-ons still wait for, or "".
func (s *State) addonProgress(ctx context.Context, cs kubernetes.Interface, withDNS bool) (string, error) {
	ds, err := cs.AppsV1().DaemonSets(AgentNamespace).Get(ctx, KubeProxyDaemonSet, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if !DaemonSetDone(ds, len(s.Nodes)) {
		return "kube-proxy: " + DaemonSetProgress(ds), nil
	}
	if !withDNS {
		return "", nil
	}
	d, err := cs.AppsV1().Deployments(AgentNamespace).Get(ctx, CoreDNSDeployment, metav1.GetOptions{})
	if err != nil {
		return "", err
	}
	if !deploymentDone(d) {
		return fmt.Sprintf("coredns: %d/%d available", d.Status.AvailableReplicas, *d.Spec.Replicas), nil
	}
	return "", nil
}

func deploymentDone(d *appsv1.Deployment) bool {
	want := int32(1)
	if d.Spec.Replicas != nil {
		want = *d.Spec.Replicas
	}
	st := d.Status
	return st.ObservedGeneration >= d.Generation && st.UpdatedReplicas == want && st.AvailableReplicas == want
}
