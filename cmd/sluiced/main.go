package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	calicoclient "github.com/projectcalico/api/pkg/client/clientset_generated/clientset"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	cnpclient "sigs.k8s.io/network-policy-api/pkg/client/clientset/versioned"

	"github.com/sluice-net/sluice/internal/endpoints"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/journal"
	"github.com/sluice-net/sluice/internal/metrics"
	"github.com/sluice-net/sluice/internal/status"
	"github.com/sluice-net/sluice/overlay"
	"github.com/sluice-net/sluice/overlay/netconf"
	"github.com/sluice-net/sluice/overlay/wireguard"
	"github.com/sluice-net/sluice/policy"
)

type listFlag []string

func (l *listFlag) String() string     { return strings.Join(*l, ",") }
func (l *listFlag) Set(v string) error { *l = append(*l, v); return nil }

type options struct {
	kubeconfig      string
	nodeName        string
	netConf         string
	ifaces          listFlag
	ifaceRegex      listFlag
	ifaceCanReach   string
	publicIP        string
	publicIPv6      string
	ipMasq          bool
	healthAddr      string
	runDir          string
	stateDir        string
	checksumOffload string
	iptablesMode    string
	resync          time.Duration
	overlayRepair   time.Duration
	podCIDRGrace    time.Duration
	policyMark      string
	strictTCP       bool
	cleanup         bool
	rotateKey       bool
	wgSocketDir     string
	logDrops        bool
	dropsLogRules   bool
	apiContentType  string
	gcPercent       int
}

func main() {
	o := options{}
	fs := flag.CommandLine
	klog.InitFlags(fs)
	fs.StringVar(&o.kubeconfig, "kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig; empty means in-cluster")
	fs.StringVar(&o.nodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (env NODE_NAME)")
	fs.StringVar(&o.netConf, "net-conf", "/etc/sluice/net-conf.json", "net-conf.json in flannel's format")
	fs.Var(&o.ifaces, "iface", "underlay interface name or IP (repeatable; first match wins)")
	fs.Var(&o.ifaceRegex, "iface-regex", "regular expression for the underlay interface name or IP (repeatable)")
	fs.StringVar(&o.ifaceCanReach, "iface-can-reach", "", "pick the interface that routes to this IP")
	fs.StringVar(&o.publicIP, "public-ip", "", "IPv4 address other nodes use to reach this one")
	fs.StringVar(&o.publicIPv6, "public-ipv6", "", "IPv6 address other nodes use to reach this one")
	fs.BoolVar(&o.ipMasq, "ip-masq", true, "masquerade pod traffic leaving the cluster network")
	fs.StringVar(&o.healthAddr, "health-addr", "127.0.0.1:9098", "address for /healthz, /readyz and /metrics; empty disables")
	fs.StringVar(&o.runDir, "run-dir", "/run/sluice", "where subnet.env and the agent socket (sluiced.sock) live")
	fs.StringVar(&o.stateDir, "state-dir", "/var/lib/sluice", "where the agent keeps its endpoints and its WireGuard key across restarts")
	fs.StringVar(&o.wgSocketDir, "wireguard-socket-dir", "/var/run/wireguard", "where the userspace WireGuard devices' UAPI sockets go, for wg and wgctrl; empty for none")
	fs.BoolVar(&o.rotateKey, "rotate-key", false, "replace this node's WireGuard key in --state-dir, then exit; the running agent republishes the new public key at its next sync and peers follow")
	fs.StringVar(&o.checksumOffload, "vxlan-tx-checksum-offload", "auto", "auto (off only on kernels before 5.7), on or off")
	fs.StringVar(&o.iptablesMode, "iptables-mode", "auto", "auto (detect as kube-proxy does), nft or legacy")
	fs.DurationVar(&o.resync, "resync-period", 5*time.Second, "how often the kernel state is re-read and repaired")
	fs.DurationVar(&o.overlayRepair, "overlay-repair-period", 0, "how often the vxlan and host-gw overlay re-reads the kernel when no Node changed; 0 is 6 x --resync-period")
	fs.StringVar(&o.policyMark, "policy-mark", "0x10000", "the mark bit policy chains set to allow a packet; must not overlap kube-proxy's 0x4000 and 0x8000")
	fs.BoolVar(&o.strictTCP, "conntrack-strict-tcp", true, "set net.netfilter.nf_conntrack_tcp_loose=0, so a connection cut by a new deny cannot be picked up again mid-stream")
	fs.DurationVar(&o.podCIDRGrace, "pod-cidr-wait", 10*time.Second, "how long after a Node's creation to wait for a podCIDR from kube-controller-manager before Sluice claims one")
	fs.BoolVar(&o.logDrops, "log-drops", true, "log the first packet of each connection policy denies (NFLOG group 21, at most 10 a second per pod and direction), for sluicectl drops and sluice_policy_drops_total")
	fs.BoolVar(&o.dropsLogRules, "drops-include-log-rules", true, "also read the NFLOG group of policies' Log rules (20) into sluicectl drops, as verdict logged; only one reader can bind a group, so set it to false when another program (ulogd) reads it")
	fs.StringVar(&o.apiContentType, "kube-api-content-type", "application/vnd.kubernetes.protobuf", "content type of requests to the API server for core objects (Nodes, Pods, Namespaces, policies); application/json to debug")
	fs.BoolVar(&o.cleanup, "cleanup", false, "remove everything Sluice put on this node (iptables chains and jumps, ipsets, tunnel devices, pod veths, routes, the agent's files and, with API access, this Node's annotations and subnet claims), then exit; run it after deleting the DaemonSet")
	fs.IntVar(&o.gcPercent, "gc-percent", defaultGCPercent, "the Go garbage collector's target (GOGC): how far the heap may grow past what is live before a collection; lower trades CPU for memory; GOGC in the environment wins")
	flag.Parse()
	applyGCPercent(o.gcPercent)

	// Sluice logs through klog. The standard logger only carries
	// vishvananda/netlink's notes on ipset attributes it does not decode
	// (the nomatch flag), which are expected and would flood the log.
	log.SetOutput(io.Discard)
	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer cancel()
	if o.rotateKey {
		key, err := wireguard.RotateKey(filepath.Join(o.stateDir, wireguard.KeyFile))
		if err != nil {
			fmt.Fprintln(os.Stderr, "sluiced: rotating the WireGuard key:", err)
			os.Exit(1)
		}
		fmt.Printf("new WireGuard public key %s; the agent applies it within --resync-period\n", key.PublicKey())
		return
	}
	if o.cleanup {
		if err := cleanupNode(ctx, o); err != nil {
			klog.ErrorS(err, "cleanup incomplete; fix the cause and run it again (it is safe to repeat)")
			klog.Flush()
			os.Exit(1)
		}
		klog.Flush()
		return
	}
	cfg, err := o.config()
	if err != nil {
		// A person has to fix this; say it plainly, not as a log record.
		fmt.Fprintln(os.Stderr, "sluiced: bad configuration:", err)
		os.Exit(2)
	}
	if err := run(ctx, o, cfg); err != nil {
		klog.ErrorS(err, "sluiced failed")
		klog.Flush()
		os.Exit(1)
	}
}

// config turns flags and files into the loop's configuration. Every error
// says which flag or field is wrong.
func (o options) config() (overlay.Config, error) {
	var cfg overlay.Config
	if o.nodeName == "" {
		return cfg, errors.New("the node name is missing: set --node-name or NODE_NAME (in the DaemonSet, from spec.nodeName)")
	}
	raw, err := os.ReadFile(o.netConf)
	if err != nil {
		return cfg, fmt.Errorf("reading --net-conf: %w", err)
	}
	nc, err := netconf.Parse(raw)
	if err != nil {
		return cfg, fmt.Errorf("%s: %w", o.netConf, err)
	}
	cfg = overlay.Config{
		NodeName:           o.nodeName,
		Net:                nc,
		Iface:              overlay.InterfaceSelection{Ifaces: o.ifaces, Regexes: o.ifaceRegex, CanReach: o.ifaceCanReach},
		IPMasq:             o.ipMasq,
		ChecksumOffload:    o.checksumOffload,
		RunDir:             o.runDir,
		StateDir:           o.stateDir,
		WireGuardSocketDir: o.wgSocketDir,
		ResyncPeriod:       o.resync,
		RepairPeriod:       o.overlayRepair,
		PodCIDRGrace:       o.podCIDRGrace,
	}
	if o.publicIP != "" {
		if cfg.PublicIP, err = netip.ParseAddr(o.publicIP); err != nil || !cfg.PublicIP.Is4() {
			return cfg, fmt.Errorf("--public-ip %q is not an IPv4 address", o.publicIP)
		}
	}
	if o.publicIPv6 != "" {
		if cfg.PublicIPv6, err = netip.ParseAddr(o.publicIPv6); err != nil || !cfg.PublicIPv6.Is6() {
			return cfg, fmt.Errorf("--public-ipv6 %q is not an IPv6 address", o.publicIPv6)
		}
	}
	switch o.checksumOffload {
	case "auto", "on", "off":
	default:
		return cfg, fmt.Errorf("--vxlan-tx-checksum-offload must be auto, on or off, not %q", o.checksumOffload)
	}
	switch o.iptablesMode {
	case "auto":
		d := iptables.Detect()
		cfg.IPTablesMode = d.Mode
		klog.InfoS("iptables backend detected", "mode", d.Mode, "reason", d.Reason)
	case "nft", "legacy":
		cfg.IPTablesMode = iptables.Mode(o.iptablesMode)
		if err := iptables.CheckMode(cfg.IPTablesMode); err != nil {
			return cfg, err
		}
	default:
		return cfg, fmt.Errorf("--iptables-mode must be auto, nft or legacy, not %q", o.iptablesMode)
	}
	return cfg, nil
}

// restConfig loads API credentials from a kubeconfig, or in-cluster.
func restConfig(kubeconfig string) (*rest.Config, error) {
	var rc *rest.Config
	var err error
	if kubeconfig != "" {
		rc, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	} else {
		rc, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("loading API credentials: %w", err)
	}
	return rc, nil
}

func run(ctx context.Context, o options, cfg overlay.Config) error {
	rc, err := restConfig(o.kubeconfig)
	if err != nil {
		return err
	}
	rc.UserAgent = "sluiced/" + cfg.NodeName
	probe := newAPIProbe(2 * time.Second)
	rc.Wrap(probe.waitForAPI)
	client, err := kubernetes.NewForConfig(coreConfig(rc, o.apiContentType))
	if err != nil {
		return err
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartStructuredLogging(2)
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	recorder := broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "sluiced", Host: cfg.NodeName})

	klog.InfoS("sluiced starting", "node", cfg.NodeName, "network", cfg.Net.Networks(), "backend", cfg.Net.Backend.Type, "iptables", cfg.IPTablesMode)
	mark, err := strconv.ParseUint(o.policyMark, 0, 32)
	if err != nil || mark == 0 || mark&(mark-1) != 0 || mark&0xc000 != 0 {
		return fmt.Errorf("--policy-mark %q must be a single bit outside kube-proxy's 0x4000 and 0x8000", o.policyMark)
	}
	loop := overlay.New(cfg, client, recorder)
	calico, err := calicoclient.NewForConfig(rc)
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return err
	}
	cnp, err := cnpclient.NewForConfig(rc)
	if err != nil {
		return err
	}
	policyLoop := policy.NewLoop(policyConfig(o, cfg, uint32(mark)), client, recorder).WithCalico(calico, dyn).WithClusterNetworkPolicies(cnp)
	registry, err := endpoints.NewRegistry(filepath.Join(o.stateDir, "endpoints"), client, policyLoop)
	if err != nil {
		return err
	}
	probe.client = client.Discovery().RESTClient()
	go probe.run(ctx)
	drops := policy.NewDropRing(dropRingSize)
	journal.Default.SetNode(cfg.NodeName)
	if o.healthAddr != "" {
		report := func() status.Report {
			r := buildReport(cfg.NodeName, loop, policyLoop, registry)
			r.API = probe.report()
			return r
		}
		go serveHealth(ctx, o.healthAddr, func() bool { return loop.Ready() && policyLoop.Ready() }, report,
			map[string]http.Handler{"/explain": explainHandler(policyLoop), "/drops": dropsHandler(drops),
				"/changes": changesHandler(journal.Default), "/matrix": matrixHandler(policyLoop)})
	}
	if o.logDrops {
		go func() {
			if err := policyLoop.RunDropLog(ctx, drops, o.dropsLogRules); err != nil {
				klog.ErrorS(err, "drop logs are not read; sluicectl drops shows nothing from this node")
			}
		}()
	}
	policyLoop.Seed(registry.List())
	errc := make(chan error, 3)
	go func() { errc <- registry.Serve(ctx, filepath.Join(o.runDir, "sluiced.sock")) }()
	go registry.RunGC(ctx, 10*o.resync)
	go func() { errc <- loop.Run(ctx) }()
	go func() { errc <- policyLoop.Run(ctx) }()
	// Any part failing for good stops the agent, so the DaemonSet
	// restarts it; a clean stop waits for all.
	for i := 0; i < 3; i++ {
		if err := <-errc; err != nil {
			return err
		}
	}
	return nil
}

// policyConfig is the policy loop's share of the flags.
func policyConfig(o options, cfg overlay.Config, mark uint32) policy.Config {
	return policy.Config{
		NodeName: cfg.NodeName, IPv4: cfg.Net.EnableIPv4, IPv6: cfg.Net.EnableIPv6,
		AcceptMark: mark, IPTablesMode: cfg.IPTablesMode, StrictTCPPickup: o.strictTCP,
		ResyncPeriod: o.resync, DropLog: o.logDrops,
	}
}

// serveHealth serves health, metrics, the status report and the
// troubleshooting handlers (explain).
func serveHealth(ctx context.Context, addr string, ready func() bool, report func() status.Report, handlers map[string]http.Handler) {
	mux := http.NewServeMux()
	for path, h := range handlers {
		mux.Handle(path, h)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !ready() {
			http.Error(w, "overlay or policy not programmed yet", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.Handle("/metrics", promhttp.HandlerFor(metrics.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/status", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(report())
	})
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { <-ctx.Done(); srv.Close() }()
	if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
		klog.ErrorS(err, "health server stopped", "addr", addr)
	}
}

// buildReport gathers what sluicectl status shows.
func buildReport(node string, ov *overlay.Loop, pl *policy.Loop, reg *endpoints.Registry) status.Report {
	ovs, ps := ov.Status(), pl.Status()
	r := status.Report{Node: node, Version: agentVersion(),
		Overlay: status.Overlay{Ready: ovs.Ready, LeaseSource: string(ovs.LeaseSource), MTU: ovs.MTU, Backend: ovs.Backend,
			Implementation: ovs.Implementation, ImplementationWhy: ovs.ImplementationWhy, PublicKey: ovs.PublicKey,
			Underlay: ovs.Underlay, LastSync: ovs.LastSync, LastError: ovs.LastError},
		Policy: status.Policy{Ready: ps.Ready, Endpoints: ps.Endpoints, Selected: ps.Selected, LastSync: ps.LastSync, LastError: ps.LastError,
			NotProgrammed: ps.NotProgrammed, Hooks: ps.Hooks, Calico: ps.Calico, Sources: ps.Sources},
	}
	for _, l := range ovs.Lease {
		r.Overlay.Lease = append(r.Overlay.Lease, l.String())
	}
	for _, ip := range ovs.PublicIPs {
		r.Overlay.PublicIPs = append(r.Overlay.PublicIPs, ip.String())
	}
	for _, p := range ovs.Peers {
		peer := status.Peer{Node: p.Node, Subnet: p.Subnet.String(), PublicIP: p.PublicIP.String(), Reachable: overlay.Reachable(p.PublicIP),
			PublicKey: p.PublicKey, Problem: p.Problem}
		if p.VtepMAC != nil {
			peer.VtepMAC = p.VtepMAC.String()
		}
		if !p.LastHandshake.IsZero() {
			hs := p.LastHandshake
			peer.LastHandshake = &hs
		}
		if !p.PublicIP.IsValid() {
			peer.PublicIP = "" // the problem says what the annotation held
		}
		r.Overlay.Peers = append(r.Overlay.Peers, peer)
	}
	for _, ep := range reg.List() {
		r.Endpoints = append(r.Endpoints, status.Endpoint{Pod: ep.Namespace + "/" + ep.Pod, HostVeth: ep.HostVeth, IPs: ep.IPs, Policies: ps.EndpointPolicies[ep.HostVeth]})
	}
	return r
}
