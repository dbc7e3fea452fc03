package lab

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Real nodes (--runtime containerd): every node runs containerd and the
// real kubelet (kube-proxy and CoreDNS are add-ons: see addons.go) in its own network namespace and a private mount namespace,
// in which the node's host paths (/etc/cni/net.d, /opt/cni/bin, /run,
// /var/lib, /var/log) are its own. The files below are written when the lab
// is provisioned; internal/lab/realnode starts the processes.

// Paths inside a real node's mount namespace.
const (
	ContainerdSocket = "/run/containerd/containerd.sock"
	// PauseImage is the sandbox image test/tools/images.sh builds.
	PauseImage = "registry.k8s.io/pause:3.10.2"
)

// ImageListPath is the list test/tools/images.sh writes: "REF ARCHIVE ID"
// per line.
func ImageListPath(toolsDir string) string {
	return filepath.Join(toolsDir, "images", "images.list")
}

// Image is one image built for real nodes.
type Image struct {
	Ref     string
	Archive string
	// ID is the digest of the image's config, which containerd reports as
	// the image ID.
	ID string
}

// Images reads the list of built images.
func Images(toolsDir string) ([]Image, error) {
	f, err := os.Open(ImageListPath(toolsDir))
	if err != nil {
		return nil, fmt.Errorf("reading the image list: %w (build the images with 'make images')", err)
	}
	defer f.Close()
	var imgs []Image
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) != 3 {
			continue
		}
		imgs = append(imgs, Image{Ref: fields[0], Archive: fields[1], ID: fields[2]})
	}
	return imgs, sc.Err()
}

// KubeletPath is the real kubelet's binary.
func KubeletPath(toolsDir string) string {
	return filepath.Join(toolsDir, kubeletToolsName, "kubelet")
}

// ContainerdConfig is the node's containerd config file.
func (n Node) ContainerdConfig() string { return filepath.Join(n.Dir, "containerd.toml") }

// KubeletConfig is the node's KubeletConfiguration file.
func (n Node) KubeletConfig() string { return filepath.Join(n.Dir, "kubelet.yaml") }

// SysctlDir holds the values the kubelet wants for global kernel
// settings, bound over /proc/sys in the node's mount namespace (see
// KernelTunables).
func (n Node) SysctlDir() string { return filepath.Join(n.Dir, "sysctl") }

// CgroupParent is the cgroup under which the node's pods run.
func (s *State) CgroupParent(n Node) string { return "/" + s.CgroupName + "/" + n.Name }

// KernelTunables are the global (not per network namespace) kernel
// settings the kubelet sets at start: vm.overcommit_memory,
// vm.panic_on_oom, kernel.panic, kernel.panic_on_oops and the root key
// quotas. Lab nodes share the host's kernel and must not change them, so
// each node sees files with these values bound over /proc/sys/... in its
// own mount namespace: the kubelet reads what it wants and writes nothing
// to the kernel.
var KernelTunables = map[string]string{
	"vm/overcommit_memory":      "1",
	"vm/panic_on_oom":           "0",
	"kernel/panic":              "10",
	"kernel/panic_on_oops":      "1",
	"kernel/keys/root_maxkeys":  "1000000",
	"kernel/keys/root_maxbytes": "25000000",
}

func (s *State) writeRealNodeConfigs() error {
	for _, n := range s.Nodes {
		if err := WriteFileAtomic(n.ContainerdConfig(), []byte(s.containerdConfig(n)), 0o644); err != nil {
			return err
		}
		if err := WriteFileAtomic(n.KubeletConfig(), []byte(s.kubeletConfig(n)), 0o644); err != nil {
			return err
		}
		for name, v := range KernelTunables {
			p := filepath.Join(n.SysctlDir(), name)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			if err := WriteFileAtomic(p, []byte(v+"\n"), 0o644); err != nil {
				return err
			}
		}
	}
	return nil
}

// containerdConfig: the node's own root, state and socket (under its
// private /var/lib and /run), its own CNI dirs, and the CRI settings that a
// node sharing a machine needs.
func (s *State) containerdConfig(n Node) string {
	return fmt.Sprintf(`# containerd of lab node %[1]s, written by sluicectl lab up.
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
oom_score = 0
# Storage and tracing plugins a lab node does not use.
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %[2]q

[ttrpc]
  address = "/run/containerd/containerd.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  # Not the host's /opt/containerd.
  path = "/var/lib/containerd-opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %[3]q
  # runc cannot lower a container's oom_score_adj below containerd's own
  # here (Permission denied, seen as "can't get final child's PID from
  # pipe: EOF").
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  # kubelet proxies exec, attach and port-forward to this server.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    # The node's private /opt/cni/bin and /etc/cni/net.d.
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
`, n.Name, ContainerdSocket, PauseImage)
}

// kubeletConfig suits a lab on a shared machine: cgroupfs with no QoS
// cgroups (pods go under the lab's own cgroup), no node allocatable
// enforcement, no eviction, no image garbage collection. The API server
// authenticates to port 10250 with a client certificate of the lab CA.
func (s *State) kubeletConfig(n Node) string {
	return fmt.Sprintf(`# kubelet of lab node %[1]s, written by sluicectl lab up.
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 0.0.0.0
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %[2]q}
authorization: {mode: AlwaysAllow}
containerRuntimeEndpoint: unix://%[3]s
imageServiceEndpoint: unix://%[3]s
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
cgroupRoot: %[4]q
enforceNodeAllocatable: []
evictionHard: {}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
failSwapOn: false
localStorageCapacityIsolation: false
resolvConf: ""
clusterDomain: %[5]s
clusterDNS: [%[6]s]
volumePluginDir: /var/lib/kubelet/volume-plugins
serializeImagePulls: false
registerNode: true
rotateCertificates: false
serverTLSBootstrap: false
podPidsLimit: -1
maxPods: 110
nodeStatusReportFrequency: 1m
syncFrequency: 10s
`, n.Name, s.Path("pki", "ca.crt"), ContainerdSocket, s.CgroupParent(n), ClusterDomain, DNSServiceIP)
}

// cgroupRoots lists the lab's cgroup in every mounted hierarchy.
func (s *State) cgroupRoots() []string {
	if s.CgroupName == "" {
		return nil
	}
	var roots []string
	entries, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range entries {
		p := filepath.Join("/sys/fs/cgroup", e.Name(), s.CgroupName)
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			roots = append(roots, p)
		}
	}
	// A pure cgroup v2 host has the tree at the top.
	if p := filepath.Join("/sys/fs/cgroup", s.CgroupName); len(roots) == 0 {
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			roots = append(roots, p)
		}
	}
	return roots
}

// cgroupProcs lists the processes in the lab's cgroups.
func (s *State) cgroupProcs() []int {
	var pids []int
	seen := map[int]bool{}
	for _, root := range s.cgroupRoots() {
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			if err != nil {
				return nil
			}
			for _, f := range strings.Fields(string(b)) {
				var pid int
				if _, err := fmt.Sscan(f, &pid); err == nil && !seen[pid] {
					seen[pid] = true
					pids = append(pids, pid)
				}
			}
			return nil
		})
	}
	return pids
}

// removeCgroups removes the lab's cgroups, deepest first. They must be
// empty of processes.
func (s *State) removeCgroups() error {
	var errs []string
	for _, root := range s.cgroupRoots() {
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := os.Remove(dirs[i]); err != nil && !os.IsNotExist(err) {
				errs = append(errs, err.Error())
			}
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("removing lab cgroups: %s", strings.Join(errs, "; "))
	}
	return nil
}

// LeftCgroups lists the lab's cgroups that still exist.
func (s *State) LeftCgroups() []string { return s.cgroupRoots() }

// findRealPod finds a pod on real nodes through the API server, and its
// network namespace through the pid containerd's shim records for one of
// its running containers (every container of a pod shares the sandbox's
// network namespace). The node's /run is a directory of the lab, so the
// record is readable from the root mount namespace.
func (s *State) findRealPod(namespace, name string) (*PodRecord, *Node, error) {
	cs, err := s.Client()
	if err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	pod, err := cs.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, nil, fmt.Errorf("pod %s/%s: %w", namespace, name, err)
	}
	n, ok := s.Node(pod.Spec.NodeName)
	if !ok {
		return nil, nil, fmt.Errorf("pod %s/%s is not on a lab node (node %q)", namespace, name, pod.Spec.NodeName)
	}
	rec := &PodRecord{Namespace: namespace, Name: name, UID: string(pod.UID), Node: n.Name, HostNetwork: pod.Spec.HostNetwork}
	for _, ip := range pod.Status.PodIPs {
		rec.IPs = append(rec.IPs, ip.IP)
	}
	if rec.HostNetwork {
		return rec, n, nil
	}
	for _, st := range pod.Status.ContainerStatuses {
		id, ok := strings.CutPrefix(st.ContainerID, "containerd://")
		if !ok || st.State.Running == nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join(n.hostDir("/run"), "containerd", "io.containerd.runtime.v2.task", "k8s.io", id, "init.pid"))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || !processAlive(pid) {
			continue
		}
		rec.NetNS = fmt.Sprintf("/proc/%d/ns/net", pid)
		return rec, n, nil
	}
	return nil, nil, fmt.Errorf("pod %s/%s has no running container", namespace, name)
}
