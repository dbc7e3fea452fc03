package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/internal/lab/container"
	"github.com/sluice-net/sluice/internal/lab/demo"
	"github.com/sluice-net/sluice/internal/lab/kubelet"
	"github.com/sluice-net/sluice/internal/lab/realnode"
)

type labFlags struct {
	name string
	dir  string
}

func (f *labFlags) resolveDir() string {
	if f.dir != "" {
		return f.dir
	}
	return lab.DirFor(f.name)
}

func (f *labFlags) load() (*lab.State, error) { return lab.Load(f.resolveDir()) }

func newLabCommand() *cobra.Command {
	f := &labFlags{}
	cmd := &cobra.Command{
		Use:   "lab",
		Short: "A real Kubernetes cluster in network namespaces on this machine",
		Long: `The lab runs etcd, kube-apiserver, kube-controller-manager and kube-scheduler
in a control-plane network namespace, and N node namespaces on a shared
underlay bridge (198.18.0.0/24, fd00:198:18::/64), each with a lab kubelet
that wires pods through the node's CNI config. Nothing in the host's own
network namespace changes.

POD means namespace/name. NODE means a node name such as node-1.`,
	}
	cmd.PersistentFlags().StringVar(&f.name, "lab", "default", "name of the lab")
	cmd.PersistentFlags().StringVar(&f.dir, "lab-dir", "", "lab directory (default $SLUICE_LAB_ROOT/NAME, SLUICE_LAB_ROOT defaults to /tmp/sluice-lab)")
	cmd.AddCommand(labUp(f), labDown(f), labStatus(f), labKubeconfig(f), labExec(f), labProbe(f), labDaemon(f), labKubelet(), labNode(), labContainerInit(), labDemo(f))
	return cmd
}

func labUp(f *labFlags) *cobra.Command {
	o := lab.Options{}
	c := &cobra.Command{
		Use:   "up",
		Short: "Create a lab and return once its nodes are Ready",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			o.Name, o.Dir = f.name, f.resolveDir()
			start := time.Now()
			s, err := lab.Up(o)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "lab %q is up with %d nodes in %.1fs\n", s.Name, len(s.Nodes), time.Since(start).Seconds())
			fmt.Fprintf(cmd.OutOrStdout(), "  export KUBECONFIG=%s\n  kubectl: %s\n", s.AdminKubeconfig(), lab.KubectlPath(s.ToolsDir))
			return nil
		},
	}
	c.Flags().IntVar(&o.Nodes, "nodes", 3, "number of nodes")
	c.Flags().BoolVar(&o.IPv6, "ipv6", false, "dual-stack cluster: IPv6 pod and service CIDRs as well")
	c.Flags().BoolVar(&o.NoPodCIDR, "no-pod-cidr", false, "do not allocate node pod CIDRs, like kubeadm init without --pod-network-cidr")
	c.Flags().StringVar(&o.CNI, "cni", "sluice", "network: sluice (apply Sluice's built-in manifest; the lab kubelets run its DaemonSet's pods), manifest (the same once you apply a manifest, or --manifest does), reference (ptp + host-local, one node only) or none")
	c.Flags().StringVar(&o.Manifest, "manifest", "", "with --cni manifest: kubectl apply this manifest and wait until its DaemonSet is Ready on every node")
	c.Flags().StringVar(&o.Backend, "backend", "vxlan", "overlay backend in the manifest's net-conf.json (with --cni sluice): vxlan, host-gw or wireguard (encrypted; the userspace implementation on kernels without the module)")
	c.Flags().StringVar(&o.Runtime, "runtime", lab.RuntimeLab, "nodes: lab (the lab kubelet, pods as processes) or containerd (the real kubelet v1.36.3 and containerd on every node, images built by 'make images')")
	c.Flags().StringVar(&o.ProxyMode, "proxy-mode", "", "kube-proxy's mode on real nodes: iptables (the default with --runtime containerd), nftables or none (no kube-proxy and no CoreDNS; the only one with --runtime lab)")
	c.Flags().StringVar(&o.ProxyBackend, "proxy-iptables", lab.ProxyBackendNFT, "the iptables backend of kube-proxy's image in iptables mode: nft or legacy")
	c.Flags().StringVar(&o.ToolsDir, "tools-dir", lab.DefaultToolsDir(), "cache of the Kubernetes and CNI tools built by 'make tools'")
	c.Flags().DurationVar(&o.Timeout, "timeout", 3*time.Minute, "how long to wait for the lab to be ready")
	return c
}

func labDown(f *labFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "down",
		Short: "Remove every namespace, process, mount and file of the lab",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			err := lab.Down(f.resolveDir())
			if errors.Is(err, lab.ErrNoLab) {
				fmt.Fprintln(cmd.OutOrStdout(), "no lab to remove")
				return nil
			}
			return err
		},
	}
}

func labStatus(f *labFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the lab's nodes and pods",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := f.load()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			daemon := "stopped"
			if s.Ready() {
				daemon = "ready"
			}
			fmt.Fprintf(out, "lab %s (%s): %s\n  kubeconfig: %s\n", s.Name, s.Dir, daemon, s.AdminKubeconfig())
			cs, err := s.Client()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 5*time.Second)
			defer cancel()
			nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
			if err != nil {
				return fmt.Errorf("API server unreachable: %w", err)
			}
			fmt.Fprintf(out, "%-10s %-15s %-6s %s\n", "NODE", "UNDERLAY", "READY", "POD CIDRS")
			for _, n := range nodes.Items {
				ready := "False"
				for _, c := range n.Status.Conditions {
					if c.Type == "Ready" {
						ready = string(c.Status)
					}
				}
				fmt.Fprintf(out, "%-10s %-15s %-6s %v\n", n.Name, nodeIP(&n), ready, n.Spec.PodCIDRs)
			}
			pods, err := cs.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "%-30s %-10s %-10s %s\n", "POD", "NODE", "PHASE", "IPS")
			for _, p := range pods.Items {
				var ips []string
				for _, ip := range p.Status.PodIPs {
					ips = append(ips, ip.IP)
				}
				fmt.Fprintf(out, "%-30s %-10s %-10s %v\n", p.Namespace+"/"+p.Name, p.Spec.NodeName, p.Status.Phase, ips)
			}
			return nil
		},
	}
}

func labKubeconfig(f *labFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "kubeconfig",
		Short: "Print the path of the lab's admin kubeconfig",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := f.load()
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), s.AdminKubeconfig())
			return nil
		},
	}
}

func labExec(f *labFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "exec NODE|POD|external|control-plane -- CMD...",
		Short: "Run a command in a node's, pod's or the outside world's namespaces",
		Args:  cobra.MinimumNArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := f.load()
			if err != nil {
				return err
			}
			place, err := s.Resolve(args[0])
			if err != nil {
				return err
			}
			c := place.Command(args[1:]...)
			c.Stdin, c.Stdout, c.Stderr = os.Stdin, cmd.OutOrStdout(), cmd.ErrOrStderr()
			err = c.Run()
			var exit *exec.ExitError
			if errors.As(err, &exit) {
				cmd.SilenceErrors = true
				return exitCode(exit.ExitCode())
			}
			return err
		},
	}
}

func labProbe(f *labFlags) *cobra.Command {
	var udp, ipv6 bool
	var timeout time.Duration
	c := &cobra.Command{
		Use:   "probe POD|NODE|external TARGET PORT",
		Short: "Connect from a pod (or node) to a target and print what answered",
		Long: `Connects over TCP (or sends a UDP datagram with --udp) from the first
argument's network namespace to TARGET:PORT, where TARGET is a POD, a NODE
(its underlay address), external, or an IP. Lab pods answer with their
namespace/name; the outside world answers with the source address it saw.
Exits non-zero when nothing answered.`,
		Args: cobra.ExactArgs(3),
		RunE: func(cmd *cobra.Command, args []string) error {
			s, err := f.load()
			if err != nil {
				return err
			}
			from, err := s.Resolve(args[0])
			if err != nil {
				return err
			}
			ip, err := s.ResolveTarget(args[1], ipv6)
			if err != nil {
				return err
			}
			port, err := strconv.Atoi(args[2])
			if err != nil || port < 1 || port > 65535 {
				return fmt.Errorf("PORT must be 1-65535, got %q", args[2])
			}
			reply, err := lab.Probe(from, ip, port, udp, timeout)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.OutOrStdout(), reply)
			return nil
		},
	}
	c.Flags().BoolVar(&udp, "udp", false, "probe over UDP")
	c.Flags().BoolVarP(&ipv6, "ipv6", "6", false, "use the target's IPv6 address")
	c.Flags().DurationVar(&timeout, "timeout", 2*time.Second, "how long to wait for an answer")
	return c
}

func labDaemon(f *labFlags) *cobra.Command {
	return &cobra.Command{
		Use:    "daemon",
		Short:  "Run the lab's supervisor (started by 'lab up')",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return lab.RunDaemon(cmd.Context(), f.resolveDir())
		},
	}
}

func labKubelet() *cobra.Command {
	var dir, node string
	c := &cobra.Command{
		Use:    "kubelet",
		Short:  "Run a lab node's kubelet (started by the lab daemon)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return kubelet.Run(cmd.Context(), dir, node)
		},
	}
	c.Flags().StringVar(&dir, "dir", "", "lab directory")
	c.Flags().StringVar(&node, "node", "", "node name")
	return c
}

func labNode() *cobra.Command {
	var dir, node string
	c := &cobra.Command{
		Use:    "node",
		Short:  "Run a real lab node: containerd and the kubelet (started by the lab daemon)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return realnode.Run(cmd.Context(), dir, node)
		},
	}
	c.Flags().StringVar(&dir, "dir", "", "lab directory")
	c.Flags().StringVar(&node, "node", "", "node name")
	return c
}

func labDemo(f *labFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "demo",
		Short: "Show NetworkPolicy at work: a connectivity matrix before and after a default deny and an allow",
		Long: `Creates pods demo/a, demo/b and demo/c on different nodes, each answering
on TCP 8080, and prints which pod connects to which: first with no policy,
then with a default-deny NetworkPolicy, then with a policy that lets a reach
b. On real nodes with kube-proxy and CoreDNS, each pod also gets a Service of
its name, and the pods probe each other by those names. Exits non-zero if a
matrix differs from what the policies mean (cells marked "!"). Running it
again starts afresh.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := f.load()
			if err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), 5*time.Minute)
			defer cancel()
			return demo.Run(ctx, s, cmd.OutOrStdout())
		},
	}
}

func labContainerInit() *cobra.Command {
	var spec string
	c := &cobra.Command{
		Use:    "container-init",
		Short:  "Become a container of a lab pod (started by the lab kubelet)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := container.ReadSpec(spec)
			if err != nil {
				return err
			}
			// Init returns only on error; on success the process is the
			// container's command.
			return container.Init(s)
		},
	}
	c.Flags().StringVar(&spec, "spec", "", "container spec written by the kubelet")
	return c
}

func nodeIP(n *corev1.Node) string {
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			return a.Address
		}
	}
	return ""
}
