package lab

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Tool binaries the lab needs, built from the Go module proxy by
// test/tools/build.sh and cached by version.
var (
	kubernetesTools = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl"}
	cniTools        = []string{"ptp", "bridge", "host-local", "loopback", "portmap", "bandwidth"}
)

// DefaultToolsDir is the cache of built tools unless SLUICE_TOOLS_DIR says
// otherwise. Binaries live in versioned subdirectories of it.
func DefaultToolsDir() string {
	if d := os.Getenv("SLUICE_TOOLS_DIR"); d != "" {
		return d
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "sluice", "tools")
	}
	return "/var/cache/sluice/tools"
}

// KubectlPath is the kubectl binary of the lab's Kubernetes version.
func KubectlPath(toolsDir string) string {
	return filepath.Join(toolsDir, kubernetesToolsName, "kubectl")
}

// CNIToolsPath is where the reference CNI plugins are cached.
func CNIToolsPath(toolsDir string) string { return filepath.Join(toolsDir, cniToolsName) }

func checkTools(dir, runtime string) error {
	var missing []string
	if runtime == RuntimeContainerd {
		if _, err := os.Stat(filepath.Join(dir, kubeletToolsName, "kubelet")); err != nil {
			missing = append(missing, kubeletToolsName+"/kubelet")
		}
		if _, err := os.Stat(ImageListPath(dir)); err != nil {
			missing = append(missing, "images/images.list (build the images with 'make images')")
		}
	}
	for _, t := range kubernetesTools {
		if _, err := os.Stat(filepath.Join(dir, kubernetesToolsName, t)); err != nil {
			missing = append(missing, kubernetesToolsName+"/"+t)
		}
	}
	for _, t := range cniTools {
		if _, err := os.Stat(filepath.Join(dir, cniToolsName, t)); err != nil {
			missing = append(missing, cniToolsName+"/"+t)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("tools missing from %s: %s; build them with 'make tools' (or set SLUICE_TOOLS_DIR)", dir, strings.Join(missing, ", "))
	}
	return nil
}

// component is one control-plane process.
type component struct {
	name  string
	netns string
	args  []string
	// privateMounts gives the process its own mount namespace, in which a
	// lab kubelet binds the node's private host paths.
	privateMounts bool
}

func (s *State) k8sTool(name string) string {
	return filepath.Join(s.ToolsDir, kubernetesToolsName, name)
}

func (s *State) controlPlane() []component {
	p := pki{dir: s.Path("pki")}
	serviceCIDR := DefaultServiceCIDR
	clusterCIDR := s.ClusterCIDR
	if s.IPv6 {
		serviceCIDR += "," + serviceCIDR6
		clusterCIDR += "," + clusterCIDR6
	}
	etcd := component{name: "etcd", netns: s.ControlNS, args: []string{
		s.k8sTool("etcd"),
		"--name=lab",
		"--data-dir=" + s.Path("etcd"),
		"--listen-client-urls=http://127.0.0.1:2379",
		"--advertise-client-urls=http://127.0.0.1:2379",
		"--listen-peer-urls=http://127.0.0.1:2380",
		"--initial-advertise-peer-urls=http://127.0.0.1:2380",
		"--initial-cluster=lab=http://127.0.0.1:2380",
		// The lab's data is disposable; fsync would only slow every write.
		"--unsafe-no-fsync",
		"--log-level=warn",
	}}
	apiserver := component{name: "kube-apiserver", netns: s.ControlNS, args: []string{
		s.k8sTool("kube-apiserver"),
		"--etcd-servers=http://127.0.0.1:2379",
		"--bind-address=::",
		fmt.Sprintf("--secure-port=%d", apiServerPort),
		"--advertise-address=" + s.ControlIP4,
		"--tls-cert-file=" + p.path("apiserver.crt"),
		"--tls-private-key-file=" + p.path("apiserver.key"),
		"--client-ca-file=" + p.path("ca.crt"),
		"--token-auth-file=" + p.path("tokens.csv"),
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-account-key-file=" + p.path("sa.pub"),
		"--service-account-signing-key-file=" + p.path("sa.key"),
		"--service-cluster-ip-range=" + serviceCIDR,
		"--allow-privileged=true",
		"--cert-dir=" + s.Path("pki", "apiserver-certs"),
		"--endpoint-reconciler-type=none",
		// Real kubelets serve exec, logs and port-forward on 10250 and
		// accept this client certificate.
		"--kubelet-client-certificate=" + p.path("kubelet-client.crt"),
		"--kubelet-client-key=" + p.path("kubelet-client.key"),
		"--kubelet-preferred-address-types=InternalIP",
		"--v=1",
	}}
	kcm := component{name: "kube-controller-manager", netns: s.ControlNS, args: []string{
		s.k8sTool("kube-controller-manager"),
		"--kubeconfig=" + p.path("kube-controller-manager.kubeconfig"),
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--cert-dir=" + s.Path("pki", "kcm-certs"),
		"--service-account-private-key-file=" + p.path("sa.key"),
		"--root-ca-file=" + p.path("ca.crt"),
		"--use-service-account-credentials=true",
		"--controllers=*",
		"--service-cluster-ip-range=" + serviceCIDR,
		"--v=1",
	}}
	if s.RealNodes() {
		// kube-proxy's DaemonSet on real nodes serves the kubernetes Service
		// (10.96.0.1) that in-cluster clients such as sluiced use, from
		// the endpoints the API server publishes for itself.
		for i, a := range apiserver.args {
			if a == "--endpoint-reconciler-type=none" {
				apiserver.args[i] = "--endpoint-reconciler-type=lease"
			}
		}
	}
	if s.NoPodCIDR {
		// Like `kubeadm init` without --pod-network-cidr: nodes get no
		// spec.podCIDR, and the network plugin has to cope.
		kcm.args = append(kcm.args, "--allocate-node-cidrs=false")
	} else {
		kcm.args = append(kcm.args, "--allocate-node-cidrs=true", "--cluster-cidr="+clusterCIDR, "--node-cidr-mask-size-ipv4=24")
		if s.IPv6 {
			kcm.args = append(kcm.args, "--node-cidr-mask-size-ipv6=64")
		}
	}
	scheduler := component{name: "kube-scheduler", netns: s.ControlNS, args: []string{
		s.k8sTool("kube-scheduler"),
		"--kubeconfig=" + p.path("kube-scheduler.kubeconfig"),
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--cert-dir=" + s.Path("pki", "scheduler-certs"),
		"--v=1",
	}}
	return []component{etcd, apiserver, kcm, scheduler}
}
