package lab

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Options configure a new lab.
type Options struct {
	Name      string
	Dir       string // defaults to DirFor(Name)
	Nodes     int
	IPv6      bool
	NoPodCIDR bool
	// CNI selects the network nodes start with: CNISluice (the default),
	// CNIReference, CNINone or CNIManifest.
	CNI string
	// Manifest, with CNIManifest, is applied with kubectl once the nodes
	// are Ready, and Up returns when its DaemonSet is Ready on every node.
	Manifest string
	// Runtime is RuntimeLab (the default) or RuntimeContainerd.
	Runtime string
	// ProxyMode is kube-proxy's mode: ProxyIPTables (the default on real
	// nodes), ProxyNFTables or ProxyNone (the only one the lab kubelet,
	// which runs no containers, has).
	ProxyMode string
	// ProxyBackend is the iptables backend of kube-proxy's image:
	// ProxyBackendNFT (the default) or ProxyBackendLegacy.
	ProxyBackend string
	// Backend is the overlay backend in the manifest's net-conf.json
	// (with CNISluice): vxlan (the default), host-gw or wireguard.
	Backend   string
	ToolsDir  string
	Sluicectl string // the binary that runs the daemon and kubelets
	Timeout   time.Duration
}

// Up creates a lab and returns once its nodes are Ready.
func Up(o Options) (*State, error) {
	if o.Nodes < 1 || o.Nodes > maxNodes {
		return nil, fmt.Errorf("--nodes must be between 1 and %d, got %d", maxNodes, o.Nodes)
	}
	if o.CNI == "" {
		o.CNI = CNISluice
	}
	if o.CNI != CNISluice && o.CNI != CNIReference && o.CNI != CNINone && o.CNI != CNIManifest {
		return nil, fmt.Errorf("--cni must be sluice, reference, none or manifest, got %q", o.CNI)
	}
	if o.Manifest != "" && o.CNI != CNIManifest {
		return nil, fmt.Errorf("--manifest needs --cni manifest (--cni sluice applies the manifest built into sluicectl)")
	}
	if o.Runtime == "" {
		o.Runtime = RuntimeLab
	}
	if o.Runtime != RuntimeLab && o.Runtime != RuntimeContainerd {
		return nil, fmt.Errorf("--runtime must be lab or containerd, got %q", o.Runtime)
	}
	if err := resolveProxy(&o); err != nil {
		return nil, err
	}
	switch o.Backend {
	case "":
		o.Backend = "vxlan"
	case "vxlan", "host-gw", "wireguard":
	default:
		return nil, fmt.Errorf("--backend must be vxlan, host-gw or wireguard, got %q", o.Backend)
	}
	if o.Name == "" {
		o.Name = "default"
	}
	if o.Dir == "" {
		o.Dir = DirFor(o.Name)
	}
	if o.ToolsDir == "" {
		o.ToolsDir = DefaultToolsDir()
	}
	if o.Timeout == 0 {
		o.Timeout = 3 * time.Minute
	}
	if o.Sluicectl == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("finding sluicectl: %w", err)
		}
		o.Sluicectl = exe
	}
	if err := checkTools(o.ToolsDir, o.Runtime); err != nil {
		return nil, err
	}
	if _, err := Load(o.Dir); err == nil {
		return nil, fmt.Errorf("a lab already exists in %s; run 'sluicectl lab down' first", o.Dir)
	}
	dir, err := filepath.Abs(o.Dir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating lab dir: %w", err)
	}
	s := newState(o, dir)
	// Record the lab before creating anything, so Down can clean up a
	// half-made lab.
	if err := s.Save(); err != nil {
		return nil, err
	}
	if err := s.provision(); err != nil {
		return s, fmt.Errorf("creating lab: %w (run 'sluicectl lab down' to clean up)", err)
	}
	if err := s.startDaemon(o.Timeout); err != nil {
		return s, err
	}
	// The daemon recorded the API proxy's port.
	loaded, err := Load(dir)
	if err != nil {
		return s, err
	}
	s = loaded
	if o.Manifest != "" {
		ctx, cancel := context.WithTimeout(context.Background(), o.Timeout)
		defer cancel()
		if out, err := s.ApplyManifest(ctx, o.Manifest); err != nil {
			return s, fmt.Errorf("%w\n%s", err, out)
		}
		if err := s.WaitAgentsReady(ctx); err != nil {
			return s, err
		}
		if s.RealNodes() {
			if err := s.WaitNodesReady(ctx); err != nil {
				return s, err
			}
		}
	}
	// CoreDNS runs once there is a pod network: with a CNI that lab up
	// installs, up waits for it too.
	withDNS := s.CNI == CNISluice || s.CNI == CNIReference || o.Manifest != ""
	ctx, cancel := context.WithTimeout(context.Background(), o.Timeout)
	defer cancel()
	if err := s.WaitAddonsReady(ctx, withDNS); err != nil {
		return s, err
	}
	return s, nil
}

// resolveProxy checks the kube-proxy options and fills in their defaults.
func resolveProxy(o *Options) error {
	if o.ProxyMode == "" {
		o.ProxyMode = ProxyNone
		if o.Runtime == RuntimeContainerd {
			o.ProxyMode = ProxyIPTables
		}
	}
	switch o.ProxyMode {
	case ProxyIPTables, ProxyNFTables, ProxyNone:
	default:
		return fmt.Errorf("--proxy-mode must be iptables, nftables or none, got %q", o.ProxyMode)
	}
	if o.ProxyMode != ProxyNone && o.Runtime != RuntimeContainerd {
		return fmt.Errorf("--proxy-mode %s needs real nodes (--runtime containerd): the lab kubelet runs no kube-proxy", o.ProxyMode)
	}
	if o.ProxyBackend == "" {
		o.ProxyBackend = ProxyBackendNFT
	}
	if o.ProxyBackend != ProxyBackendNFT && o.ProxyBackend != ProxyBackendLegacy {
		return fmt.Errorf("--proxy-iptables must be nft or legacy, got %q", o.ProxyBackend)
	}
	if o.ProxyBackend == ProxyBackendLegacy && o.ProxyMode != ProxyIPTables {
		return fmt.Errorf("--proxy-iptables legacy needs --proxy-mode iptables")
	}
	return nil
}

func newState(o Options, dir string) *State {
	idb := make([]byte, 3)
	_, _ = rand.Read(idb)
	id := hex.EncodeToString(idb)
	prefix := "sl" + id + "-"
	s := &State{
		Name:         o.Name,
		Dir:          dir,
		ID:           id,
		IPv6:         o.IPv6,
		NoPodCIDR:    o.NoPodCIDR,
		ClusterCIDR:  DefaultClusterCIDR,
		CNI:          o.CNI,
		ToolsDir:     o.ToolsDir,
		Sluicectl:    o.Sluicectl,
		UnderlayNS:   prefix + "underlay",
		ControlNS:    prefix + "cp",
		ExternalNS:   prefix + "external",
		ControlIP4:   controlPlaneIP4,
		ControlIP6:   controlPlaneIP6,
		ExternalIP4:  externalIP4,
		ExternalIP6:  externalIP6,
		Runtime:      o.Runtime,
		ProxyMode:    o.ProxyMode,
		ProxyBackend: o.ProxyBackend,
		Backend:      o.Backend,
	}
	if o.Runtime == RuntimeContainerd {
		s.CgroupName = "sluice-lab-" + id
	}
	s.KubeconfigOut = s.AdminKubeconfig()
	s.NetNSes = []string{s.UnderlayNS, s.ControlNS, s.ExternalNS}
	for i := 0; i < o.Nodes; i++ {
		name := fmt.Sprintf("node-%d", i+1)
		ip4, ip6 := nodeAddrs(i, true)
		n := Node{Name: name, NetNS: prefix + name, IP4: ip4, IP6: ip6, Dir: filepath.Join(dir, "nodes", name)}
		s.Nodes = append(s.Nodes, n)
		s.NetNSes = append(s.NetNSes, n.NetNS)
	}
	return s
}

// Node host paths. Each is a directory under the node's Dir, bind-mounted
// over the real path inside the node's mount namespace.
var nodeHostPaths = []string{"/etc/cni/net.d", "/opt/cni/bin", "/run", "/var/lib", "/var/log"}

// NodeHostPaths are the paths private to each node.
func NodeHostPaths() []string { return append([]string(nil), nodeHostPaths...) }

func (n Node) hostDir(path string) string { return filepath.Join(n.Dir, "host", path) }

// HostDir is where the node's private copy of a host path lives.
func (n Node) HostDir(path string) string { return n.hostDir(path) }

func (s *State) provision() error {
	for _, d := range []string{"logs", "etcd", "pki"} {
		if err := os.MkdirAll(s.Path(d), 0o700); err != nil {
			return err
		}
	}
	if err := (pki{dir: s.Path("pki")}).generate(s); err != nil {
		return err
	}
	for _, n := range s.Nodes {
		for _, p := range nodeHostPaths {
			if err := os.MkdirAll(n.hostDir(p), 0o755); err != nil {
				return err
			}
		}
		if err := os.MkdirAll(filepath.Join(n.Dir, "pods"), 0o755); err != nil {
			return err
		}
		// The reference plugins are always installed, like a distribution's
		// containernetworking-plugins package; Sluice's installer adds its own.
		for _, t := range cniTools {
			if err := copyFile(filepath.Join(CNIToolsPath(s.ToolsDir), t), filepath.Join(n.hostDir("/opt/cni/bin"), t), 0o755); err != nil {
				return err
			}
		}
	}
	if s.RealNodes() {
		if err := s.writeRealNodeConfigs(); err != nil {
			return err
		}
	} else if s.RunsSluiceImage() {
		if err := s.stageImage(); err != nil {
			return err
		}
	}
	return buildTopology(s)
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("copying %s: %w", src, err)
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		return fmt.Errorf("copying to %s: %w", dst, err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copying to %s: %w", dst, err)
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}

// startDaemon starts `sluicectl lab daemon` in a new session, detached from
// the caller, and waits until it reports the lab ready.
func (s *State) startDaemon(timeout time.Duration) error {
	logf, err := os.OpenFile(s.Path("logs", "daemon.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(s.Sluicectl, "lab", "daemon", "--lab-dir", s.Dir)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting lab daemon: %w", err)
	}
	pid := cmd.Process.Pid
	if err := WriteFileAtomic(s.Path(daemonPidFileName), []byte(strconv.Itoa(pid)), 0o644); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	deadline := time.After(timeout)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case err := <-exited:
			return fmt.Errorf("lab daemon exited (%v); last lines of %s:\n%s", err, s.Path("logs", "daemon.log"), tail(s.Path("logs", "daemon.log"), 20))
		case <-deadline:
			return fmt.Errorf("lab not ready after %s; see %s:\n%s", timeout, s.Path("logs"), tail(s.Path("logs", "daemon.log"), 20))
		case <-tick.C:
			if _, err := os.Stat(s.Path(readyFileName)); err == nil {
				// The daemon outlives us: it was started in its own session.
				_ = cmd.Process.Release()
				return nil
			}
		}
	}
}

// Ready reports whether the lab daemon said the lab is ready.
func (s *State) Ready() bool {
	_, err := os.Stat(s.Path(readyFileName))
	return err == nil
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// DaemonPID returns the pid of the lab daemon, or 0.
func (s *State) DaemonPID() int {
	b, err := os.ReadFile(s.Path(daemonPidFileName))
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

var errNotRunning = errors.New("not running")

// processAlive reports whether pid is a live process (not a zombie).
func processAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name in parentheses.
	st := string(b)
	if i := strings.LastIndexByte(st, ')'); i >= 0 && i+2 < len(st) {
		return st[i+2] != 'Z'
	}
	return true
}
