package lab

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

// RunDaemon is the lab's supervisor. It runs the control plane and one lab
// kubelet per node, restarts any of them that die, serves the API server on
// loopback for the root namespace, and writes the ready file once every node
// is Ready. It returns when ctx is cancelled or on SIGTERM, stopping all it
// started.
func RunDaemon(ctx context.Context, dir string) error {
	s, err := Load(dir)
	if err != nil {
		return err
	}
	ctx, cancel := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer cancel()

	sup := &supervisor{state: s}
	defer sup.stopAll()

	comps := s.controlPlane()
	sup.start(ctx, comps[0]) // etcd
	sup.start(ctx, comps[1]) // kube-apiserver

	port, err := serveAPIProxy(ctx, s)
	if err != nil {
		return err
	}
	s.APIProxyPort = port
	if err := s.Save(); err != nil {
		return err
	}
	p := pki{dir: s.Path("pki")}
	tok, err := p.token("admin")
	if err != nil {
		return err
	}
	if err := writeKubeconfig(s.AdminKubeconfig(), fmt.Sprintf("https://127.0.0.1:%d", port), p.path("ca.crt"), tok); err != nil {
		return err
	}
	if err := waitAPIServer(ctx, s); err != nil {
		return err
	}
	klog.InfoS("API server ready", "proxy", port)
	if s.RunsKubeProxy() {
		// As kubeadm init does: the add-ons go in before any node has a
		// network; kube-proxy's pods need none.
		if err := s.applyAddons(ctx); err != nil {
			return err
		}
		klog.InfoS("cluster add-ons applied", "proxyMode", s.ProxyMode, "image", s.kubeProxyImage())
	}
	for _, c := range comps[2:] {
		sup.start(ctx, c)
	}
	for _, n := range s.Nodes {
		sup.start(ctx, s.kubeletComponent(n))
	}
	if err := serveExternal(ctx, s); err != nil {
		return err
	}

	if err := s.waitNodesReady(ctx); err != nil {
		return err
	}
	if err := WriteFileAtomic(s.Path(readyFileName), []byte(time.Now().Format(time.RFC3339)), 0o644); err != nil {
		return err
	}
	klog.InfoS("lab ready", "nodes", len(s.Nodes))
	<-ctx.Done()
	klog.InfoS("lab daemon stopping")
	return nil
}

func (s *State) kubeletComponent(n Node) component {
	if s.RealNodes() {
		// containerd and the real kubelet, entered with nsenter --net only:
		// `ip netns exec` would remount /sys and hide the cgroup mounts.
		return component{name: "node-" + n.Name, netns: n.NetNS, privateMounts: true, args: []string{
			s.Sluicectl, "lab", "node", "--dir", s.Dir, "--node", n.Name,
		}}
	}
	return component{name: "kubelet-" + n.Name, netns: n.NetNS, privateMounts: true, args: []string{
		s.Sluicectl, "lab", "kubelet", "--dir", s.Dir, "--node", n.Name,
	}}
}

type supervisor struct {
	state *State
	mu    sync.Mutex
	procs map[string]*os.Process
	wg    sync.WaitGroup
}

// start runs c in its network namespace and restarts it with a delay
// whenever it exits, until ctx ends. Kubelets get a private mount namespace
// so each node sees only its own host paths.
func (sup *supervisor) start(ctx context.Context, c component) {
	sup.wg.Add(1)
	go func() {
		defer sup.wg.Done()
		for ctx.Err() == nil {
			sup.state.waitReleased(ctx, c.name) // hold.go
			if ctx.Err() != nil {
				return
			}
			err := sup.runOnce(ctx, c)
			if ctx.Err() != nil {
				return
			}
			klog.ErrorS(err, "lab component exited; restarting", "component", c.name)
			select {
			case <-ctx.Done():
			case <-time.After(time.Second):
			}
		}
	}()
}

func (sup *supervisor) runOnce(ctx context.Context, c component) error {
	logf, err := os.OpenFile(sup.state.Path("logs", c.name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	nsArgs := []string{"--net=" + netnsPath(c.netns)}
	args := append(append(nsArgs, "--"), c.args...)
	cmd := exec.Command("nsenter", args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{}
	if c.privateMounts {
		// Go makes / recursively private in the new mount namespace, so the
		// node's bind mounts never propagate back to the host.
		cmd.SysProcAttr.Unshareflags = syscall.CLONE_NEWNS
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", c.name, err)
	}
	sup.mu.Lock()
	if sup.procs == nil {
		sup.procs = map[string]*os.Process{}
	}
	sup.procs[c.name] = cmd.Process
	sup.mu.Unlock()
	return sup.state.WaitOrStop(ctx, c.name, cmd, 5*time.Second)
}

func (sup *supervisor) stopAll() { sup.wg.Wait() }

// dialInNetNS opens a TCP connection from inside a network namespace. The
// socket stays in that namespace after the thread returns, so the root
// namespace can proxy to addresses it has no route to.
func dialInNetNS(netns, network, addr string, timeout time.Duration) (net.Conn, error) {
	var conn net.Conn
	err := inNetNS(netns, func() error {
		var err error
		conn, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	return conn, err
}

// serveAPIProxy forwards 127.0.0.1:PORT in the root namespace to the API
// server in the control-plane namespace. TLS passes through untouched.
func serveAPIProxy(ctx context.Context, s *State) (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("listening for the API proxy: %w", err)
	}
	go func() { <-ctx.Done(); ln.Close() }()
	target := net.JoinHostPort(s.ControlIP4, strconv.Itoa(apiServerPort))
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				up, err := dialInNetNS(s.ControlNS, "tcp", target, 5*time.Second)
				if err != nil {
					klog.V(2).InfoS("API proxy dial failed", "err", err)
					return
				}
				defer up.Close()
				splice(c, up)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func splice(a, b net.Conn) {
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		_, _ = io.Copy(dst, src)
		if tc, ok := dst.(*net.TCPConn); ok {
			_ = tc.CloseWrite()
		}
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	<-done
}

func waitAPIServer(ctx context.Context, s *State) error {
	ca, err := os.ReadFile(s.Path("pki", "ca.crt"))
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	url := fmt.Sprintf("https://127.0.0.1:%d/readyz", s.APIProxyPort)
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	return fmt.Errorf("API server not ready after 2m; see %s", s.Path("logs", "kube-apiserver.log"))
}

// Client returns a client for the lab's API server as the lab admin.
func (s *State) Client() (kubernetes.Interface, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", s.AdminKubeconfig())
	if err != nil {
		return nil, fmt.Errorf("loading lab kubeconfig: %w", err)
	}
	cfg.QPS, cfg.Burst = 100, 200
	return kubernetes.NewForConfig(cfg)
}

// waitNodesReady waits for every node to register and turn Ready, and, when
// pod CIDRs are allocated, for each to get one. With CNISluice it applies
// Sluice's manifest once every node is Ready and waits for its agents to
// bring each node's network up; with CNIReference it writes the reference
// CNI config. Then it waits for the default ServiceAccount without which no
// pod passes admission.
func (s *State) waitNodesReady(ctx context.Context) error {
	cs, err := s.Client()
	if err != nil {
		return err
	}
	written := map[string]bool{}
	installed := false
	for {
		ready, registered := 0, 0
		for _, n := range s.Nodes {
			node, err := cs.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				continue
			}
			if s.RealNodes() && !nodeReady(node) {
				// A real kubelet reports its node Ready only once the
				// runtime's network is: after a CNI config is installed.
				// Sluice's DaemonSet tolerates the not-ready taint.
				registered++
				if s.CNI == CNIReference && !s.NoPodCIDR && !written[n.Name] && len(node.Spec.PodCIDRs) > 0 {
					if err := WriteReferenceConflist(n, node.Spec.PodCIDRs, 1500); err != nil {
						return err
					}
					written[n.Name] = true
				}
				continue
			}
			if !nodeReady(node) {
				continue
			}
			registered++
			if s.CNI == CNISluice && !sluiceReady(node) {
				continue
			}
			if !s.NoPodCIDR && len(node.Spec.PodCIDRs) == 0 {
				continue
			}
			if s.CNI == CNIReference && !s.NoPodCIDR && !written[n.Name] {
				if err := WriteReferenceConflist(n, node.Spec.PodCIDRs, 1500); err != nil {
					return err
				}
				written[n.Name] = true
			}
			ready++
		}
		if s.CNI == CNISluice && !installed && registered == len(s.Nodes) {
			// The DaemonSet's pods land on every node; its agents give each
			// node its network.
			if err := s.installManifest(ctx); err != nil {
				return err
			}
			klog.InfoS("sluice manifest applied")
			installed = true
		}
		// With --cni manifest or none, nobody installs a CNI config before
		// lab up returns: real nodes are done once registered.
		done := ready == len(s.Nodes)
		if s.RealNodes() && (s.CNI == CNIManifest || s.CNI == CNINone) {
			done = registered == len(s.Nodes)
		}
		if done {
			if _, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err == nil {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func nodeReady(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// ReferenceConflistName is the file the lab writes for the reference plugins.
const ReferenceConflistName = "50-lab-ptp.conflist"

// WriteReferenceConflist gives a node the reference ptp + host-local chain
// with portmap and bandwidth, the stand-in for a network plugin until Sluice
// installs its own.
func WriteReferenceConflist(n Node, podCIDRs []string, mtu int) error {
	var ranges [][]map[string]string
	for _, c := range podCIDRs {
		ranges = append(ranges, []map[string]string{{"subnet": c}})
	}
	conf := map[string]any{
		"cniVersion": "1.0.0",
		"name":       "lab-ptp",
		"plugins": []any{
			map[string]any{
				"type": "ptp",
				"mtu":  mtu,
				"ipam": map[string]any{"type": "host-local", "ranges": ranges, "routes": []map[string]string{{"dst": "0.0.0.0/0"}, {"dst": "::/0"}}},
			},
			map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}, "snat": true},
			map[string]any{"type": "bandwidth", "capabilities": map[string]bool{"bandwidth": true}},
		},
	}
	b, err := json.MarshalIndent(conf, "", "  ")
	if err != nil {
		return err
	}
	return WriteFileAtomic(filepath.Join(n.hostDir("/etc/cni/net.d"), ReferenceConflistName), b, 0o644)
}
