// Package realnode runs a real lab node: containerd and the kubelet of
// Kubernetes v1.36.3, in the node's network namespace and a mount namespace
// of the node's own, in which the node's host paths are private. kube-proxy
// runs as the kube-proxy DaemonSet's pods, as on a kubeadm cluster.
//
// The lab daemon starts one process per node with `nsenter --net=` (not `ip
// netns exec`, which remounts /sys and hides the cgroup mounts the kubelet
// needs) in a new mount namespace. That process binds the node's paths,
// starts containerd, imports the images built by test/tools/images.sh into
// its k8s.io namespace, starts the kubelet, and restarts either when it
// exits. Containers then run under the lab's cgroup, which lab down removes.
package realnode

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/lab"
)

// Run prepares the node's mount namespace and runs containerd and the
// kubelet until ctx ends.
func Run(ctx context.Context, dir, nodeName string) error {
	s, err := lab.Load(dir)
	if err != nil {
		return err
	}
	n, ok := s.Node(nodeName)
	if !ok {
		return fmt.Errorf("lab has no node %q", nodeName)
	}
	if err := bindHostPaths(*n); err != nil {
		return err
	}
	if err := lab.WriteFileAtomic(filepath.Join(n.Dir, "kubelet.pid"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	logger := klog.FromContext(ctx).WithValues("node", n.Name)

	var wg sync.WaitGroup
	defer wg.Wait()
	containerd := []string{"containerd", "--config", n.ContainerdConfig()}
	wg.Add(1)
	go func() { defer wg.Done(); supervise(ctx, s, n.Name+"-containerd", containerd) }()
	if err := waitSocket(ctx, lab.ContainerdSocket, time.Minute); err != nil {
		return err
	}
	start := time.Now()
	if err := importImages(ctx, s.ToolsDir); err != nil {
		return err
	}
	logger.Info("images imported", "took", time.Since(start).Round(time.Millisecond))

	nodeIP := n.IP4
	if s.IPv6 && n.IP6 != "" {
		nodeIP += "," + n.IP6
	}
	kubelet := []string{lab.KubeletPath(s.ToolsDir),
		"--config=" + n.KubeletConfig(),
		"--kubeconfig=" + s.Path("pki", "node-"+n.Name+".kubeconfig"),
		"--hostname-override=" + n.Name,
		"--node-ip=" + nodeIP,
		"--v=1",
	}
	env, err := kubeletEnv(s, *n)
	if err != nil {
		return err
	}
	wg.Add(1)
	go func() { defer wg.Done(); supervise(ctx, s, n.Name+"-kubelet", kubelet, env...) }()
	<-ctx.Done()
	return nil
}

// bindHostPaths gives this mount namespace the node's private host paths,
// and the kernel settings the kubelet insists on as files of its own.
func bindHostPaths(n lab.Node) error {
	if err := lab.BindNodeHostPaths(n, lab.NodeHostPaths()); err != nil {
		return err
	}
	for name := range lab.KernelTunables {
		src := filepath.Join(n.SysctlDir(), name)
		dst := filepath.Join("/proc/sys", name)
		if err := syscall.Mount(src, dst, "", syscall.MS_BIND, ""); err != nil {
			return fmt.Errorf("binding %s over %s: %w", src, dst, err)
		}
	}
	return nil
}

// kubeletEnv is the kubelet's environment. A node whose kube-proxy uses
// iptables-legacy is a legacy node: its kubelet finds the legacy tools
// first on its PATH, so its KUBE-IPTABLES-HINT lands where kube-proxy's
// rules do, as on a host whose iptables alternative is legacy.
func kubeletEnv(s *lab.State, n lab.Node) ([]string, error) {
	if s.ProxyBackend != lab.ProxyBackendLegacy {
		return nil, nil
	}
	dir := filepath.Join(n.Dir, "iptables-legacy-bin")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	for _, tool := range []string{"iptables", "iptables-save", "iptables-restore", "ip6tables", "ip6tables-save", "ip6tables-restore"} {
		target, err := exec.LookPath(strings.Replace(tool, "tables", "tables-legacy", 1))
		if err != nil {
			return nil, fmt.Errorf("a legacy node needs %s: %w", tool, err)
		}
		link := filepath.Join(dir, tool)
		_ = os.Remove(link)
		if err := os.Symlink(target, link); err != nil {
			return nil, err
		}
	}
	return []string{"PATH=" + dir + ":" + os.Getenv("PATH")}, nil
}

// supervise runs argv with env added to the environment, logging to the
// lab's logs, and restarts it a second after it exits until ctx ends. On
// ctx's end it sends SIGTERM, then SIGKILL after 10 s.
func supervise(ctx context.Context, s *lab.State, name string, argv []string, env ...string) {
	for ctx.Err() == nil {
		err := runOnce(ctx, s, name, argv, env)
		if ctx.Err() != nil {
			return
		}
		klog.ErrorS(err, "node component exited; restarting", "component", name)
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

func runOnce(ctx context.Context, s *lab.State, name string, argv, env []string) error {
	logf, err := os.OpenFile(s.Path("logs", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", name, err)
	}
	return s.WaitOrStop(ctx, name, cmd, 10*time.Second)
}

func waitSocket(ctx context.Context, path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c, err := net.DialTimeout("unix", path, time.Second)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("containerd not serving on %s after %s: %w", path, timeout, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func ctr(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "ctr", append([]string{"--address", lab.ContainerdSocket, "--namespace", "k8s.io"}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ctr %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// importImages imports every built image into containerd's k8s.io
// namespace, the one the CRI plugin serves, and unpacks it for the
// overlayfs snapshotter. An archive holding several tags is imported once
// and tagged.
func importImages(ctx context.Context, toolsDir string) error {
	imgs, err := lab.Images(toolsDir)
	if err != nil {
		return err
	}
	imported := map[string]string{} // archive -> ref it was imported as
	for _, img := range imgs {
		if first, ok := imported[img.Archive]; ok {
			if _, err := ctr(ctx, "images", "tag", "--force", first, img.Ref); err != nil {
				return err
			}
			continue
		}
		if _, err := ctr(ctx, "images", "import", img.Archive); err != nil {
			return err
		}
		imported[img.Archive] = img.Ref
	}
	out, err := ctr(ctx, "images", "ls", "--quiet")
	if err != nil {
		return err
	}
	have := map[string]bool{}
	for _, ref := range strings.Fields(out) {
		have[ref] = true
	}
	for _, img := range imgs {
		if !have[img.Ref] {
			return fmt.Errorf("image %s is not in containerd after importing %s", img.Ref, img.Archive)
		}
	}
	return nil
}
