package overlay

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/atomicfile"
	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/journal"
	"github.com/sluice-net/sluice/overlay/lease"
	"github.com/sluice-net/sluice/overlay/masq"
	"github.com/sluice-net/sluice/overlay/netconf"
	"github.com/sluice-net/sluice/overlay/vxlan"
)

// Config is the overlay loop's configuration.
type Config struct {
	NodeName string
	Net      *netconf.Config
	Iface    InterfaceSelection
	// PublicIP and PublicIPv6 override the advertised underlay addresses.
	PublicIP, PublicIPv6 netip.Addr
	IPMasq               bool
	// ChecksumOffload is auto, on or off (see checksumOffloadWanted).
	ChecksumOffload string
	// RunDir receives subnet.env for the CNI plugin.
	RunDir string
	// StateDir keeps what must outlive the agent: the WireGuard key.
	StateDir string
	// WireGuardSocketDir receives the userspace WireGuard devices' UAPI
	// sockets, for wg and wgctrl; empty for none.
	WireGuardSocketDir string
	ResyncPeriod       time.Duration
	// RepairPeriod is how often a resync with no Node changed re-reads
	// the kernel on the vxlan and host-gw backends (see lightResync); 0 is
	// 6 × ResyncPeriod.
	RepairPeriod time.Duration
	IPTablesMode iptables.Mode
	// PodCIDRGrace is how long a new Node waits for a podCIDR from
	// kube-controller-manager before Sluice claims a subnet for it.
	PodCIDRGrace time.Duration
}

// Loop is the overlay loop.
type Loop struct {
	cfg      Config
	client   kubernetes.Interface
	recorder record.EventRecorder
	nodes    corelisters.NodeLister
	queue    workqueue.TypedRateLimitingInterface[string]
	underlay *Underlay
	// families are the IP families the loop programs, IPv4 first, as
	// Status.Lease lists them; Run builds them.
	families []*family
	// offloadDone records devices whose checksum offload was applied; only
	// the sync goroutine touches it.
	offloadDone map[string]bool
	// nodesChanged is set by Node events. A sync that follows none, after
	// the first, writes only what drifted: those writes are repairs.
	nodesChanged atomic.Bool
	// problems are the peers last reported as not programmed; only the
	// sync goroutine touches them.
	problems map[peerKey]string
	// backend is net-conf.json's Backend.Type's; Run makes it.
	backend backend
	// prog is what was programmed, for the incremental path; peerSyncs
	// counts the Node changes that path took.
	prog      programmed
	peerSyncs atomic.Int64
	// fullWanted asks the next resync to re-read the kernel (the own
	// Node's update); lastFull is when a full sync last succeeded.
	fullWanted atomic.Bool
	lastFull   time.Time

	mu     sync.RWMutex
	status Status
}

// Status is what the loop reports about itself.
type Status struct {
	Lease       []netip.Prefix
	LeaseSource lease.Source
	MTU         int
	Backend     string
	Underlay    string
	PublicIPs   []netip.Addr
	// Peers holds one entry per remote node and family, with the reason
	// when it could not be programmed.
	Peers     []PeerStatus
	Ready     bool
	LastSync  time.Time
	LastError string
	Repairs   vxlan.Changes
	// Implementation is the wireguard backend's (kernel or userspace),
	// ImplementationWhy what decided it, and PublicKey the node's key.
	Implementation, ImplementationWhy, PublicKey string
}

const syncKey = "overlay"

// New returns a loop; Run starts it.
func New(cfg Config, client kubernetes.Interface, recorder record.EventRecorder) *Loop {
	if cfg.ResyncPeriod == 0 {
		cfg.ResyncPeriod = 5 * time.Second
	}
	if cfg.RepairPeriod == 0 {
		cfg.RepairPeriod = 6 * cfg.ResyncPeriod
	}
	return &Loop{
		cfg:         cfg,
		client:      client,
		recorder:    recorder,
		offloadDone: map[string]bool{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](200*time.Millisecond, 30*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "overlay"}),
	}
}

// Status returns a copy of the loop's status.
func (l *Loop) Status() Status {
	l.mu.RLock()
	defer l.mu.RUnlock()
	s := l.status
	s.Peers = append([]PeerStatus(nil), s.Peers...)
	return s
}

// Ready reports whether the overlay is programmed.
func (l *Loop) Ready() bool {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.status.Ready // without Status's copy of every peer
}

// lease is the node's subnets, without Status's copy of every peer.
func (l *Loop) lease() []netip.Prefix {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.status.Lease
}

// Run runs the loop until ctx ends. It returns an error only for problems
// that a restart cannot fix (bad flags); everything else is retried.
func (l *Loop) Run(ctx context.Context) error {
	logger := klog.FromContext(ctx).WithName("overlay")
	ctx = klog.NewContext(ctx, logger)
	var err error
	if l.underlay, err = FindUnderlay(l.cfg.Iface); err != nil {
		return err
	}
	if err := l.checkFamilies(); err != nil {
		return err
	}
	for _, fam := range iptables.Families(l.cfg.Net.EnableIPv4, l.cfg.Net.EnableIPv6) {
		r, err := iptables.New(fam, l.cfg.IPTablesMode)
		if err != nil {
			return err
		}
		l.families = append(l.families, &family{Family: fam, ipt: r})
	}
	logger.Info("underlay selected", "interface", l.underlay.Link.Attrs().Name, "ipv4", l.underlay.IP4, "ipv6", l.underlay.IP6, "mtu", l.underlay.Link.Attrs().MTU)
	if l.backend, err = newBackend(l); err != nil {
		return err
	}
	if err := l.backend.start(ctx); err != nil {
		return err
	}
	defer l.backend.stop()
	l.publishBackendMetric()

	subnets, source, err := l.acquireLease(ctx)
	if err != nil {
		return err // only ctx cancellation gets here
	}
	l.setStatus(func(s *Status) {
		s.Lease, s.LeaseSource, s.MTU, s.Backend = subnets, source, l.mtu(), l.cfg.Net.Backend.Type
		s.Underlay = l.underlay.Link.Attrs().Name
		s.PublicIPs = l.publicIPs()
	})

	factory := informers.NewSharedInformerFactoryWithOptions(l.client, 10*time.Minute, informers.WithTransform(slimNode))
	nodeInformer := factory.Core().V1().Nodes()
	l.nodes = nodeInformer.Lister()
	if _, err := nodeInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { l.peerChanged(nodeName(obj), "added") },
		UpdateFunc: func(old, cur any) { l.onNodeUpdate(old, cur) },
		DeleteFunc: func(obj any) { l.peerChanged(nodeName(obj), "deleted") },
	}); err != nil {
		return err
	}
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	defer factory.Shutdown()

	// The timer brings back anything deleted behind our back.
	go wait.UntilWithContext(ctx, func(context.Context) { l.queue.Add(syncKey) }, l.cfg.ResyncPeriod)
	go func() { <-ctx.Done(); l.queue.ShutDown() }()
	for l.processNext(ctx) {
	}
	return nil
}

// onNodeUpdate ignores the heartbeat updates that make up most Node events;
// only changes to what the overlay reads queue a sync.
func (l *Loop) onNodeUpdate(old, cur any) {
	o, ok1 := old.(*corev1.Node)
	c, ok2 := cur.(*corev1.Node)
	if ok1 && ok2 && strings.Join(o.Spec.PodCIDRs, ",") == strings.Join(c.Spec.PodCIDRs, ",") && annotationsEqual(o, c) &&
		slices.Equal(o.Status.Addresses, c.Status.Addresses) { // the known-node set holds them
		if o.Name == l.cfg.NodeName {
			// The own node's status updates still get a sync (it reads
			// more of its own node), but not as a change of input.
			l.fullWanted.Store(true)
			l.queue.Add(syncKey)
		}
		return
	}
	l.peerChanged(nodeName(cur), "changed")
}

// peerChanged queues the sync of one changed Node: the own node's changes
// (lease, addresses, annotations) get a full sync, another's only its own
// (see processPeer).
func (l *Loop) peerChanged(name, what string) {
	journal.Default.Pending("overlay", "Node "+name+" "+what)
	if name == l.cfg.NodeName || name == "?" || !l.Ready() {
		// Before the first full sync is done, every Node is in the next.
		l.nodeChanged()
		return
	}
	l.queue.Add(nodeKeyPrefix + name)
}

// nodeName names a Node of an informer event, tombstones included.
func nodeName(obj any) string {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		return t.Key
	}
	if n, ok := obj.(*corev1.Node); ok {
		return n.Name
	}
	return "?"
}

func (l *Loop) nodeChanged() {
	klog.V(4).InfoS("node changed")
	l.nodesChanged.Store(true)
	l.queue.Add(syncKey)
}

func annotationsEqual(a, b *corev1.Node) bool {
	for k, v := range a.Annotations {
		if strings.HasPrefix(k, annotationPrefix) && b.Annotations[k] != v {
			return false
		}
	}
	for k := range b.Annotations {
		if _, ok := a.Annotations[k]; strings.HasPrefix(k, annotationPrefix) && !ok {
			return false
		}
	}
	return true
}

func (l *Loop) processNext(ctx context.Context) bool {
	key, quit := l.queue.Get()
	if quit {
		return false
	}
	defer l.queue.Done(key)
	if name, ok := strings.CutPrefix(key, nodeKeyPrefix); ok {
		l.processPeer(ctx, key, name)
		return true
	}
	start := time.Now()
	repair := !l.nodesChanged.Swap(false) && l.Ready()
	if repair && l.lightResync() {
		if err := l.syncOwn(ctx); err != nil {
			klog.FromContext(ctx).Error(err, "overlay resync failed; will retry")
			l.queue.AddRateLimited(key)
			return true
		}
		l.setStatus(func(s *Status) { s.LastSync, s.LastError = time.Now(), "" })
		l.queue.Forget(key)
		return true
	}
	journal.Default.StartSync("overlay", repair)
	ch, err := l.sync(ctx, repair)
	l.setStatus(func(s *Status) {
		s.LastSync = time.Now()
		if err != nil {
			s.LastError = err.Error()
		} else {
			s.LastError = ""
		}
		if repair {
			s.Repairs.Device += ch.Device
			s.Repairs.Routes += ch.Routes
			s.Repairs.Neighbours += ch.Neighbours
			s.Repairs.FDB += ch.FDB
			s.Repairs.Peers += ch.Peers
			s.Repairs.Removed += ch.Removed
		}
	})
	observeSync(time.Since(start), ch, err, repair)
	if err != nil {
		klog.FromContext(ctx).Error(err, "overlay sync failed; will retry")
		l.queue.AddRateLimited(key)
		return true
	}
	l.queue.Forget(key)
	if !l.Ready() {
		if err := l.setNetworkAvailable(ctx); err != nil {
			klog.FromContext(ctx).Error(err, "setting NetworkUnavailable=False")
			l.queue.AddRateLimited(key)
			return true
		}
		l.setStatus(func(s *Status) { s.Ready = true })
		klog.FromContext(ctx).Info("overlay ready", "lease", l.Status().Lease, "mtu", l.mtu())
	}
	return true
}

func (l *Loop) setStatus(f func(*Status)) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f(&l.status)
}

// family is the overlay loop's share of one IP family, as kube-proxy
// builds one single-family proxier per family: its rule writer, and what
// the loop did to the family's rules.
type family struct {
	iptables.Family
	ipt *iptables.Runner
	// filterCleared records that a non-vxlan backend removed the VXLAN
	// source filter a former vxlan configuration may have left.
	filterCleared bool
}

func (l *Loop) checkFamilies() error {
	if l.cfg.Net.EnableIPv4 && !l.underlay.IP4.IsValid() {
		return fmt.Errorf("net-conf.json enables IPv4 but underlay interface %s has no IPv4 address; pick another with --iface", l.underlay.Link.Attrs().Name)
	}
	if l.cfg.Net.EnableIPv6 && !l.underlay.IP6.IsValid() {
		return fmt.Errorf("net-conf.json enables IPv6 but underlay interface %s has no global IPv6 address; pick another with --iface or set EnableIPv6 false", l.underlay.Link.Attrs().Name)
	}
	return nil
}

// publicIPs are the advertised underlay addresses: the flags, else the
// interface's.
func (l *Loop) publicIPs() []netip.Addr {
	var ips []netip.Addr
	for _, f := range l.families {
		ips = append(ips, l.publicIP(f.Is6()))
	}
	return ips
}

func (l *Loop) publicIP(v6 bool) netip.Addr {
	if v6 {
		if l.cfg.PublicIPv6.IsValid() {
			return l.cfg.PublicIPv6
		}
		return l.underlay.IP6
	}
	if l.cfg.PublicIP.IsValid() {
		return l.cfg.PublicIP
	}
	return l.underlay.IP4
}

// mtu is the MTU of tunnels and pod veths alike: the configured one, or the
// underlay's minus the backend's overhead (VXLAN: 50 bytes over IPv4, 70
// over IPv6; WireGuard: 60 and 80). In dual-stack the IPv6 one applies to
// both, so a pod never sends a packet one of its tunnels cannot carry.
func (l *Loop) mtu() int {
	if l.cfg.Net.Backend.MTU != 0 {
		return l.cfg.Net.Backend.MTU
	}
	return l.underlay.Link.Attrs().MTU - l.backend.overhead(l.cfg.Net.EnableIPv6)
}

// The VXLAN devices' name prefixes. contract.MustTunnelPrefix keeps them
// off the pod veth prefix, which the policy loop matches as a pod.
var (
	vxlanPrefix4 = contract.MustTunnelPrefix("vx-sluice.")
	vxlanPrefix6 = contract.MustTunnelPrefix("vx6-sluice.")
)

// deviceName names a VXLAN device: its family's prefix and the VNI.
func deviceName(v6 bool, vni int) string {
	if v6 {
		return vxlanPrefix6 + strconv.Itoa(vni)
	}
	return vxlanPrefix4 + strconv.Itoa(vni)
}

// sync makes the kernel match the cluster's Nodes. With repair, no Node
// changed since the last sync, so whatever it writes was drift.
func (l *Loop) sync(ctx context.Context, repair bool) (vxlan.Changes, error) {
	self, err := l.nodes.Get(l.cfg.NodeName)
	if err != nil {
		return vxlan.Changes{}, fmt.Errorf("reading own node: %w", err)
	}
	if err := l.backend.refresh(ctx); err != nil {
		return vxlan.Changes{}, err
	}
	if err := l.publishAnnotations(ctx, self); err != nil {
		return vxlan.Changes{}, err
	}
	nodes, err := l.nodes.List(labels.Everything())
	if err != nil {
		return vxlan.Changes{}, fmt.Errorf("listing nodes: %w", err)
	}
	l.prog.valid = false
	total, peers, err := l.backend.sync(ctx, nodes)
	if err != nil {
		return total, err
	}
	l.reportPeers(ctx, peers)
	l.setStatus(func(s *Status) { s.Peers = peers })
	for _, f := range l.families {
		if err := l.syncRules(ctx, f, nodes, repair); err != nil {
			return total, err
		}
	}
	if err := writeSubnetEnv(l.cfg.RunDir, l.cfg.Net, l.lease(), l.mtu(), l.cfg.IPMasq); err != nil {
		return total, err
	}
	l.rebuildProgrammed(nodes, peers)
	l.lastFull = time.Now()
	return total, nil
}

// table is the wanted overlay of one family, without its peers: with a
// VXLAN device, or without one for host-gw.
func (l *Loop) table(own netip.Prefix, v6, device bool) vxlan.Table {
	tab := vxlan.Table{Own: own, UnderlayIndex: l.underlay.Link.Attrs().Index, DirectRouting: l.cfg.Net.Backend.DirectRouting}
	if device {
		local := l.underlay.IP4
		if v6 {
			local = l.underlay.IP6
		}
		tab.Device = &vxlan.Device{
			Name: deviceName(v6, l.cfg.Net.Backend.VNI), VNI: l.cfg.Net.Backend.VNI, Port: l.cfg.Net.Backend.Port,
			GBP: l.cfg.Net.Backend.GBP, LocalIP: local, UnderlayIndex: l.underlay.Link.Attrs().Index,
			MTU: l.mtu(), MAC: VtepMAC(l.cfg.NodeName, v6), VTEPAddr: own.Addr(),
		}
	}
	return tab
}

// syncTables programs the vxlan and host-gw backends: the device (with
// device), routes, neighbour and FDB entries of every family. A peer that
// cannot be programmed is returned with its problem and does not stop the
// others; an error is one that affects them all.
func (l *Loop) syncTables(ctx context.Context, nodes []*corev1.Node, device bool) (vxlan.Changes, []PeerStatus, error) {
	var total vxlan.Changes
	var peers []PeerStatus
	lease := l.lease()
	for i, f := range l.families {
		v6 := f.Is6()
		tab := l.table(lease[i], v6, device)
		var fam []PeerStatus
		for _, n := range nodes {
			if n.Name == l.cfg.NodeName || n.DeletionTimestamp != nil {
				continue
			}
			p, problem, ok := peerOf(n, v6)
			if !ok {
				continue
			}
			fam = append(fam, PeerStatus{Peer: p, IPv6: v6, Problem: problem})
			if problem == "" {
				tab.Peers = append(tab.Peers, p)
			}
		}
		ch, err := vxlan.Sync(tab)
		total = addChanges(total, ch)
		if err != nil {
			return total, nil, fmt.Errorf("programming the %s overlay: %w", familyName(v6), err)
		}
		if ch.Total() > 0 {
			klog.FromContext(ctx).Info("overlay entries written", "ipv6", v6, "changes", ch, "peers", len(tab.Peers))
		}
		peers = append(peers, withProblems(fam, ch.Skipped)...)
		if tab.Device != nil && (ch.Device > 0 || !l.offloadDone[tab.Device.Name]) {
			// ethtool is asked only when the device is new or changed.
			if err := l.ensureChecksumOffload(ctx, tab.Device.Name); err != nil {
				return total, nil, err
			}
			l.offloadDone[tab.Device.Name] = true
		}
	}
	return total, peers, nil
}

// syncRules checks the family's iptables rules and sets, and repairs what
// drifted: masquerade and the VXLAN source filter.
func (l *Loop) syncRules(ctx context.Context, f *family, nodes []*corev1.Node, repair bool) error {
	logger := klog.FromContext(ctx)
	ready := l.Ready()
	// The rules depend on the configuration only, not on the Nodes: a sync
	// for a Node change leaves their check (several iptables runs, most of
	// such a sync's time at 5,000 nodes) to the periodic resync, which
	// repairs them within ResyncPeriod as before.
	checkRules := repair || !ready
	if l.cfg.IPMasq && checkRules {
		network := l.cfg.Net.Network
		if f.Is6() {
			network = l.cfg.Net.IPv6Network
		}
		rules := masq.Rules{Network: network, RandomFully: f.ipt.HasRandomFully()}
		if ok, err := rules.Check(f.ipt); err != nil || !ok {
			if err := rules.Apply(f.ipt); err != nil {
				return err
			}
			if ready {
				logger.Info("masquerade rules repaired", "ipv6", f.Is6())
				countRepair("masquerade")
			}
		}
	}
	// The forwarding decision (SLUICE-FORWARD) is the policy loop's: it
	// owns the jumps into its chains and repairs them.
	return l.syncSourceFilter(ctx, f, nodes, repair && ready, checkRules)
}

func addChanges(a, b vxlan.Changes) vxlan.Changes {
	return vxlan.Changes{Device: a.Device + b.Device, Routes: a.Routes + b.Routes, Neighbours: a.Neighbours + b.Neighbours, FDB: a.FDB + b.FDB,
		Peers: a.Peers + b.Peers, Removed: a.Removed + b.Removed}
}

// acquireLease retries until the node has its subnets. A problem a person
// must fix is reported on the Node (condition and Event) as well as in the
// log; the loop never exits over it, so the agent does not crash-loop.
func (l *Loop) acquireLease(ctx context.Context) ([]netip.Prefix, lease.Source, error) {
	alloc := &lease.Allocator{Client: l.client, Config: l.cfg.Net, PodCIDRGrace: l.cfg.PodCIDRGrace}
	backoff := wait.Backoff{Duration: time.Second, Factor: 2, Cap: 30 * time.Second, Steps: 1 << 30}
	for {
		got, err := alloc.Acquire(ctx, l.cfg.NodeName)
		if err == nil {
			klog.FromContext(ctx).Info("lease acquired", "subnets", got.Subnets, "source", got.Source)
			return got.Subnets, got.Source, nil
		}
		if e, ok := lease.IsUserError(err); ok {
			klog.FromContext(ctx).Error(nil, e.Message, "reason", e.Reason)
			l.reportLeaseProblem(ctx, e)
			// sluicectl status shows what the Event says, reason and fix.
			l.setStatus(func(s *Status) { s.LastError = e.Reason + ": " + e.Message })
		} else {
			klog.FromContext(ctx).Error(err, "acquiring lease; will retry")
			l.setStatus(func(s *Status) { s.LastError = err.Error() })
		}
		select {
		case <-ctx.Done():
			return nil, "", ctx.Err()
		case <-time.After(backoff.Step()):
		}
	}
}

// ensureChecksumOffload applies the TX checksum offload decision to a
// device, only when it differs from what the device has.
func (l *Loop) ensureChecksumOffload(ctx context.Context, dev string) error {
	want, why := checksumOffloadWanted(l.cfg.ChecksumOffload, kernelRelease())
	have, err := vxlan.TXChecksumOffload(dev)
	if err != nil {
		return err
	}
	if have == want {
		return nil
	}
	klog.FromContext(ctx).Info("setting VXLAN TX checksum offload", "device", dev, "on", want, "why", why)
	return vxlan.SetTXChecksumOffload(dev, want)
}

// checksumOffloadWanted decides TX checksum offload on the VXLAN device.
// Kernels before 5.7 corrupt the UDP checksum of VXLAN packets that
// MASQUERADE --random-fully rewrote (flannel#1279, calico#3145: the
// "63-second delay"); Calico turns offload off on those kernels only
// (felix#2811). Everywhere else offload stays on, because turning it off
// costs most of the tunnel's throughput.
func checksumOffloadWanted(mode, release string) (bool, string) {
	switch mode {
	case "on":
		return true, "--vxlan-tx-checksum-offload=on"
	case "off":
		return false, "--vxlan-tx-checksum-offload=off"
	}
	major, minor, ok := parseKernelRelease(release)
	if !ok {
		return true, fmt.Sprintf("kernel release %q not understood; keeping offload on", release)
	}
	if major < 5 || (major == 5 && minor < 7) {
		return false, fmt.Sprintf("kernel %d.%d is older than 5.7 and has the VXLAN checksum bug", major, minor)
	}
	return true, fmt.Sprintf("kernel %d.%d is not affected by the VXLAN checksum bug", major, minor)
}

func parseKernelRelease(r string) (int, int, bool) {
	parts := strings.SplitN(r, ".", 3)
	if len(parts) < 2 {
		return 0, 0, false
	}
	major, err1 := strconv.Atoi(parts[0])
	minorStr := parts[1]
	for i, c := range minorStr {
		if c < '0' || c > '9' {
			minorStr = minorStr[:i]
			break
		}
	}
	minor, err2 := strconv.Atoi(minorStr)
	return major, minor, err1 == nil && err2 == nil
}

func kernelRelease() string {
	var u syscall.Utsname
	if err := syscall.Uname(&u); err != nil {
		return ""
	}
	var b []byte
	for _, c := range u.Release {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

// writeSubnetEnv publishes what the CNI plugin needs, atomically, like
// flannel's subnet.env.
func writeSubnetEnv(dir string, nc *netconf.Config, subnets []netip.Prefix, mtu int, ipMasq bool) error {
	if dir == "" {
		return nil
	}
	var b strings.Builder
	i := 0
	if nc.EnableIPv4 {
		fmt.Fprintf(&b, "SLUICE_NETWORK=%s\nSLUICE_SUBNET=%s\n", nc.Network, subnets[i])
		i++
	}
	if nc.EnableIPv6 {
		fmt.Fprintf(&b, "SLUICE_IPV6_NETWORK=%s\nSLUICE_IPV6_SUBNET=%s\n", nc.IPv6Network, subnets[i])
	}
	fmt.Fprintf(&b, "SLUICE_MTU=%d\nSLUICE_IPMASQ=%v\n", mtu, ipMasq)
	path := dir + "/subnet.env"
	if cur, err := os.ReadFile(path); err == nil && string(cur) == b.String() {
		return nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	return atomicfile.Write(path, []byte(b.String()), 0o644)
}
