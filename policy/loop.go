package policy

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	networkinglisters "k8s.io/client-go/listers/networking/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/cni/endpointapi"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/metrics"
)

// Config configures the policy loop.
type Config struct {
	NodeName string
	// IPv4 and IPv6 say which families to program.
	IPv4, IPv6 bool
	// AcceptMark is the mark bit policy chains set; it must avoid
	// kube-proxy's 0x4000 and 0x8000.
	AcceptMark   uint32
	IPTablesMode iptables.Mode
	// ResyncPeriod is how often the kernel is re-read to repair drift.
	ResyncPeriod time.Duration
	// StrictTCPPickup turns off conntrack's loose TCP pickup, so a
	// connection cut by a new deny cannot be revived mid-stream.
	StrictTCPPickup bool
}

// Loop is the policy loop. It is the endpoint registry's Programmer: an
// endpoint registration returns once a sync that includes it is applied.
type Loop struct {
	cfg      Config
	client   kubernetes.Interface
	recorder record.EventRecorder
	queue    workqueue.TypedRateLimitingInterface[string]

	pods       corelisters.PodLister
	namespaces corelisters.NamespaceLister
	policies   networkinglisters.NetworkPolicyLister
	dataplanes map[bool]*Dataplane // by ipv6

	mu        sync.Mutex
	endpoints map[string]endpointapi.Endpoint
	wanted    uint64        // generation of the endpoint set
	applied   uint64        // last generation programmed
	appliedCh chan struct{} // closed and replaced on every apply
	lastInput uint64        // inputGen at the last sync, for conntrack; sync goroutine only
	inputGen  atomic.Uint64
	reread    atomic.Bool // set by the resync timer, honoured by sync
	status    Status
	started   time.Time
	// Only the sync goroutine touches these caches.
	policyCache map[string]cachedPolicy
	podCache    map[string]*Pod
}

// Status is what the loop reports.
type Status struct {
	Ready bool
	// Selected counts, per policy, the local endpoints it selects.
	Selected map[string]int
	// EndpointPolicies lists, per host veth, the policies selecting it.
	EndpointPolicies map[string][]string
	LastSync         time.Time
	LastError        string
	Endpoints        int
}

const syncKey = "policy"

// NewLoop returns a loop; Run starts it.
func NewLoop(cfg Config, client kubernetes.Interface, recorder record.EventRecorder) *Loop {
	if cfg.ResyncPeriod == 0 {
		cfg.ResyncPeriod = 5 * time.Second
	}
	if cfg.AcceptMark == 0 {
		cfg.AcceptMark = 0x10000
	}
	return &Loop{
		cfg:        cfg,
		client:     client,
		recorder:   recorder,
		endpoints:  map[string]endpointapi.Endpoint{},
		appliedCh:  make(chan struct{}),
		dataplanes: map[bool]*Dataplane{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](50*time.Millisecond, 10*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "policy"}),
	}
}

// Seed adds endpoints known from before a restart.
func (l *Loop) Seed(eps []endpointapi.Endpoint) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, ep := range eps {
		l.endpoints[ep.Key()] = ep
	}
	l.wanted++
}

// ProgramEndpoint adds an endpoint and waits until its chains are in the
// kernel, so the pod's first packet meets its policy.
func (l *Loop) ProgramEndpoint(ctx context.Context, ep endpointapi.Endpoint) error {
	l.mu.Lock()
	l.endpoints[ep.Key()] = ep
	l.wanted++
	gen := l.wanted
	l.mu.Unlock()
	l.queue.Add(syncKey)
	for {
		l.mu.Lock()
		done, ch, lastErr := l.applied >= gen, l.appliedCh, l.status.LastError
		l.mu.Unlock()
		if done {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("endpoint not programmed in time (last error: %s): %w", lastErr, ctx.Err())
		}
	}
}

// RemoveEndpoint forgets an endpoint; its chains go with the next sync.
func (l *Loop) RemoveEndpoint(_ context.Context, ep endpointapi.Endpoint) error {
	l.mu.Lock()
	delete(l.endpoints, ep.Key())
	l.wanted++
	l.mu.Unlock()
	l.queue.Add(syncKey)
	return nil
}

// Status returns a copy of the loop's status.
func (l *Loop) Status() Status {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.status
	s.Selected = map[string]int{}
	for k, v := range l.status.Selected {
		s.Selected[k] = v
	}
	s.EndpointPolicies = map[string][]string{}
	for k, v := range l.status.EndpointPolicies {
		s.EndpointPolicies[k] = append([]string(nil), v...)
	}
	return s
}

func uniqueSorted(in []string) []string {
	sort.Strings(in)
	out := in[:0]
	for i, s := range in {
		if i == 0 || s != in[i-1] {
			out = append(out, s)
		}
	}
	return out
}

// Ready reports whether the policy loop has programmed the node once.
func (l *Loop) Ready() bool { return l.Status().Ready }

// Run runs the loop until ctx ends.
func (l *Loop) Run(ctx context.Context) error {
	l.started = time.Now()
	logger := klog.FromContext(ctx).WithName("policy")
	ctx = klog.NewContext(ctx, logger)
	if l.cfg.StrictTCPPickup {
		// A deny cuts established flows by deleting their conntrack
		// entries. With loose pickup, the next mid-stream packet would
		// create a new entry, possibly in the reverse direction, and pass
		// as established; without it, that packet is INVALID and dropped.
		if err := os.WriteFile("/proc/sys/net/netfilter/nf_conntrack_tcp_loose", []byte("0"), 0o644); err != nil {
			logger.Error(err, "turning off conntrack's loose TCP pickup; a new deny may not cut established connections")
		}
	}
	for _, v6 := range l.families() {
		fam := iptables.IPv4
		if v6 {
			fam = iptables.IPv6
		}
		r, err := iptables.New(fam, l.cfg.IPTablesMode)
		if err != nil {
			return err
		}
		l.dataplanes[v6] = NewDataplane(r, v6)
	}
	factory := informers.NewSharedInformerFactory(l.client, 10*time.Minute)
	changed := func() { l.inputGen.Add(1); l.queue.Add(syncKey) }
	enqueue := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { changed() },
		UpdateFunc: func(any, any) { changed() },
		DeleteFunc: func(any) { changed() },
	}
	pods, nss, nps := factory.Core().V1().Pods(), factory.Core().V1().Namespaces(), factory.Networking().V1().NetworkPolicies()
	for _, inf := range []cache.SharedIndexInformer{pods.Informer(), nss.Informer(), nps.Informer()} {
		if _, err := inf.AddEventHandler(enqueue); err != nil {
			return err
		}
	}
	l.pods, l.namespaces, l.policies = pods.Lister(), nss.Lister(), nps.Lister()
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	defer factory.Shutdown()

	// The periodic re-read brings back deleted rules, chains and sets. It
	// runs in the sync goroutine, which alone touches the dataplanes.
	go wait.UntilWithContext(ctx, func(context.Context) {
		l.reread.Store(true)
		l.queue.Add(syncKey)
	}, l.cfg.ResyncPeriod)
	go func() { <-ctx.Done(); l.queue.ShutDown() }()
	for l.processNext(ctx) {
	}
	return nil
}

func (l *Loop) families() []bool {
	var f []bool
	if l.cfg.IPv4 {
		f = append(f, false)
	}
	if l.cfg.IPv6 {
		f = append(f, true)
	}
	return f
}

func (l *Loop) processNext(ctx context.Context) bool {
	key, quit := l.queue.Get()
	if quit {
		return false
	}
	defer l.queue.Done(key)
	start := time.Now()
	err := l.sync(ctx)
	metrics.ApplyDuration.WithLabelValues("policy").Observe(time.Since(start).Seconds())
	if err != nil {
		metrics.ApplyErrors.WithLabelValues("policy").Inc()
		klog.FromContext(ctx).Error(err, "policy sync failed; will retry")
		l.mu.Lock()
		l.status.LastError = err.Error()
		l.mu.Unlock()
		l.queue.AddRateLimited(key)
		return true
	}
	l.queue.Forget(key)
	return true
}

// sync renders the whole desired state and applies what differs.
func (l *Loop) sync(ctx context.Context) error {
	began := time.Now()
	defer func() {
		if d := time.Since(began); d > 100*time.Millisecond {
			klog.FromContext(ctx).V(2).Info("slow policy sync", "ms", d.Milliseconds())
		}
	}()
	if l.reread.Swap(false) {
		for _, d := range l.dataplanes {
			if err := d.ReadKernel(); err != nil {
				return fmt.Errorf("re-reading the kernel: %w", err)
			}
		}
	}
	l.mu.Lock()
	gen := l.wanted
	eps := make([]endpointapi.Endpoint, 0, len(l.endpoints))
	for _, ep := range l.endpoints {
		eps = append(eps, ep)
	}
	l.mu.Unlock()
	sort.Slice(eps, func(i, j int) bool { return eps[i].HostVeth < eps[j].HostVeth })

	pols, err := l.modelPolicies(ctx)
	if err != nil {
		return err
	}
	nsList, err := l.namespaces.List(labels.Everything())
	if err != nil {
		return err
	}
	namespaces := map[string]*Namespace{}
	for _, ns := range nsList {
		namespaces[ns.Name] = &Namespace{Name: ns.Name, Labels: ns.Labels}
	}
	podList, err := l.pods.List(labels.Everything())
	if err != nil {
		return err
	}
	byName := map[string]*Pod{}
	var pods []*Pod
	podCache := make(map[string]*Pod, len(podList))
	for _, p := range podList {
		version := string(p.UID) + "/" + p.ResourceVersion
		m, ok := l.podCache[version]
		if !ok {
			m = modelPod(p)
		}
		if m == nil {
			continue
		}
		podCache[version] = m
		// Local endpoints get their IPs from the registry below: copy
		// rather than change the cached pod.
		cp := *m
		byName[p.Namespace+"/"+p.Name] = &cp
		pods = append(pods, &cp)
	}
	l.podCache = podCache
	var locals []LocalEndpoint
	selected := map[string]int{}
	epPolicies := map[string][]string{}
	for _, ep := range eps {
		pod := byName[ep.Namespace+"/"+ep.Pod]
		if pod == nil {
			// Not in the cache yet: its labels are unknown, but
			// namespace-wide policies already apply to it.
			pod = &Pod{Namespace: ep.Namespace, Name: ep.Pod, Labels: labels.Set{}}
			pods = append(pods, pod)
		}
		pod.IPs = nil
		for _, s := range ep.IPs {
			if ip, err := netip.ParseAddr(s); err == nil {
				pod.IPs = append(pod.IPs, ip)
			}
		}
		in, out := Selecting(pols, pod)
		for _, k := range append(append([]string{}, in...), out...) {
			selected[k]++
		}
		epPolicies[ep.HostVeth] = uniqueSorted(append(append([]string{}, in...), out...))
		locals = append(locals, LocalEndpoint{Pod: pod, HostVeth: ep.HostVeth, Ingress: in, Egress: out})
	}
	changed := false
	modelled := time.Now()
	for _, v6 := range l.families() {
		r := &Renderer{IPv6: v6, AcceptMark: l.cfg.AcceptMark}
		rs := r.Render(pols, locals, pods, namespaces)
		rendered := time.Now()
		st, err := l.dataplanes[v6].Apply(rs)
		if err != nil {
			return err
		}
		if st.Changed() {
			changed = true
			klog.FromContext(ctx).V(2).Info("policy rules written", "ipv6", v6, "stats", st,
				"renderMs", rendered.Sub(modelled).Milliseconds(), "applyMs", time.Since(rendered).Milliseconds())
		}
	}
	// Any pod, namespace or policy event may have narrowed what is allowed.
	input := l.inputGen.Load()
	inputChanged := input != l.lastInput && l.lastInput != 0
	l.lastInput = input
	if inputChanged && changed {
		// A change may stop allowing flows that conntrack would let
		// through as established: cut them.
		if n, err := cutDeniedFlows(pols, pods, namespaces, locals); err != nil {
			klog.FromContext(ctx).Error(err, "cutting denied connections")
		} else if n > 0 {
			klog.FromContext(ctx).Info("cut connections that policy no longer allows", "flows", n)
		}
	}
	for k, n := range selected {
		metrics.PolicyEndpoints.WithLabelValues(k).Set(float64(n))
	}
	metrics.EndpointsProgrammed.Set(float64(len(locals)))
	metrics.PoliciesProgrammed.Set(float64(len(pols)))
	l.mu.Lock()
	if gen > l.applied {
		l.applied = gen
	}
	close(l.appliedCh)
	l.appliedCh = make(chan struct{})
	first := !l.status.Ready
	l.status = Status{Ready: true, Selected: selected, EndpointPolicies: epPolicies, LastSync: time.Now(), Endpoints: len(locals)}
	l.mu.Unlock()
	if first {
		klog.FromContext(ctx).Info("policy programmed", "endpoints", len(locals), "policies", len(pols), "pods", len(pods),
			"sinceStartMs", time.Since(l.started).Milliseconds())
	}
	return nil
}

// modelPolicies converts every NetworkPolicy. A policy that cannot be
// translated still isolates its pods (fails closed), and the operator
// hears of it as a warning Event.
func (l *Loop) modelPolicies(ctx context.Context) (map[string]*Policy, error) {
	list, err := l.policies.List(labels.Everything())
	if err != nil {
		return nil, err
	}
	out := map[string]*Policy{}
	cache := map[string]cachedPolicy{}
	for _, np := range list {
		// Converting (parsing selectors) is the costly part of a sync at
		// scale; a policy is converted again only when it changed.
		version := string(np.UID) + "/" + np.ResourceVersion
		c, ok := l.policyCache[version]
		if !ok {
			c = cachedPolicy{p: FromNetworkPolicy(np)}
			if c.p.Broken != "" {
				l.reportBroken(ctx, np, c.p.Broken)
			}
		}
		cache[version] = c
		out[c.p.Key] = c.p
	}
	l.policyCache = cache
	return out, nil
}

type cachedPolicy struct{ p *Policy }

func (l *Loop) reportBroken(ctx context.Context, np *networkingv1.NetworkPolicy, why string) {
	klog.FromContext(ctx).Info("policy cannot be rendered; its pods allow nothing it would have allowed", "policy", np.Namespace+"/"+np.Name, "problem", why)
	if l.recorder != nil {
		l.recorder.Eventf(np, corev1.EventTypeWarning, "PolicyNotRendered", "sluice on %s cannot render this policy (%s); the pods it selects fail closed", l.cfg.NodeName, why)
	}
}

// modelPod converts a pod, or returns nil for one without a pod IP of its
// own (hostNetwork) or that has finished.
func modelPod(p *corev1.Pod) *Pod {
	if p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return nil
	}
	m := &Pod{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels, NamedPorts: map[string]NamedPort{}}
	for _, ip := range p.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			m.IPs = append(m.IPs, a)
		}
	}
	if len(m.IPs) == 0 {
		for _, s := range strings.Split(p.Annotations[endpointapi.PodIPsAnnotation], ",") {
			if a, err := netip.ParseAddr(strings.TrimSpace(s)); err == nil {
				m.IPs = append(m.IPs, a)
			}
		}
	}
	for _, c := range p.Spec.Containers {
		for _, port := range c.Ports {
			if port.Name == "" {
				continue
			}
			proto := Protocol(port.Protocol)
			if proto == "" {
				proto = TCP
			}
			m.NamedPorts[port.Name] = NamedPort{Protocol: proto, Number: port.ContainerPort}
		}
	}
	return m
}
