package policy

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	calicoclient "github.com/projectcalico/api/pkg/client/clientset_generated/clientset"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/cni/endpointapi"
	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/journal"
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
	// CalicoDetectPeriod is how often the loop looks for Calico CRDs that
	// appeared, or a finished migration from Canal.
	CalicoDetectPeriod time.Duration
	// DropLog logs denied connections to NFLOG (droplog.go).
	DropLog bool
}

// Loop is the policy loop. It is the endpoint registry's
// contract.EndpointProgrammer: an endpoint registration returns once a
// sync that includes it is applied.
type Loop struct {
	cfg      Config
	client   kubernetes.Interface
	recorder record.EventRecorder
	queue    workqueue.TypedRateLimitingInterface[string]

	pods            corelisters.PodLister
	namespaces      corelisters.NamespaceLister
	serviceAccounts corelisters.ServiceAccountLister
	// sources are the policy kinds the loop reads (sources.go); calico
	// the Calico API's informers, when the cluster has one.
	sources      []*policySource
	calico       *calicoSources
	calicoClient calicoclient.Interface
	dynClient    dynamic.Interface
	// cnp is the ClusterNetworkPolicy source (cnp_source.go), and
	// fixedSources the number of sources a Calico switch keeps.
	cnp          *cnpSources
	fixedSources int
	// calicoAPI is the Calico API the loop reads; calicoWanted (under mu)
	// the one the detector last found.
	calicoAPI    CalicoAPI
	calicoWanted CalicoAPI
	// families are the IP families the loop programs, in the order of
	// the renderers of state; Run builds them.
	families []*family

	mu        sync.Mutex
	endpoints map[string]endpointapi.Endpoint
	wanted    uint64        // generation of the endpoint set
	applied   uint64        // last generation programmed
	appliedCh chan struct{} // closed and replaced on every apply
	dirty     dirtyKeys     // objects changed since the last sync
	status    Status
	started   time.Time

	// Only the sync goroutine touches these.
	state        *clusterState
	seenEndpoint uint64 // endpoint generation the state has
	policyCache  map[string]cachedObject[*Policy]
	podCache     map[string]cachedObject[*Pod]
	nsCache      map[string]cachedObject[*Namespace]
	selectedKeys map[string]bool // policies with a selected-endpoints gauge
	tiers        map[string]*Tier
	netsetCache  map[string]*NetworkSet
	// invalid are the policies that could not be converted, and
	// refused the ones the kernel would not take, with the reason; both
	// fail closed. refused is what has been reported in Events.
	invalid, refused map[string]string
	// chainOwners maps policy chain names to their policy and direction.
	chainOwners map[string]policyChainRef
	// dataplaneHook lets a test poison a dataplane, and writerHook put
	// a fake rule writer in front of (or in place of) a family's runner.
	dataplaneHook func(*Dataplane)
	writerHook    func(contract.HookWriter) contract.HookWriter

	// podLookup is the pod cache ProgramEndpoint checks (admission.go).
	podLookup atomic.Pointer[podLookup]

	// netns is the network namespace the loop programs; the re-reader
	// and the connection cutter run in it from their own goroutines.
	netns     ns.NetNS
	kernel    chan []KernelState // latest periodic re-read, one per family
	rereadNow chan struct{}
	cutFlows  chan cutRequest // latest conntrack cut to make
	// model is the model of the last sync that changed it, for explain.
	model atomic.Pointer[modelSnapshot]
}

// dirtyKeys are the keys of changed objects: model keys for policies
// ("namespace/name" for networking/v1), "namespace/name" for pods and
// service accounts, the name for namespaces, the kind and key for network
// sets ("NetworkSet/ns/name"); tiers says a tier changed.
type dirtyKeys struct {
	policies, pods, namespaces, netsets, serviceAccounts map[string]bool
	tiers                                                bool
}

func (d *dirtyKeys) take() dirtyKeys {
	out := *d
	*d = dirtyKeys{policies: map[string]bool{}, pods: map[string]bool{}, namespaces: map[string]bool{},
		netsets: map[string]bool{}, serviceAccounts: map[string]bool{}}
	return out
}

// restore puts back keys a failed sync took, so its retry sees them.
func (d *dirtyKeys) restore(taken dirtyKeys) {
	maps.Copy(d.policies, taken.policies)
	maps.Copy(d.pods, taken.pods)
	maps.Copy(d.namespaces, taken.namespaces)
	maps.Copy(d.netsets, taken.netsets)
	maps.Copy(d.serviceAccounts, taken.serviceAccounts)
	d.tiers = d.tiers || taken.tiers
}

func (d *dirtyKeys) empty() bool {
	return len(d.policies)+len(d.pods)+len(d.namespaces)+len(d.netsets)+len(d.serviceAccounts) == 0 && !d.tiers
}

// cachedObject is an object's model and the version it was made from.
// Reusing the model of an unchanged object keeps its pointer, which is
// how clusterState tells what changed.
type cachedObject[T any] struct {
	version string
	model   T
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
	// NotProgrammed lists the policies that fail closed on this node,
	// with the reason: they could not be converted, or the kernel
	// refused them or a set they use.
	NotProgrammed map[string]string
	// Hooks says what is wrong with the jumps into the policy chains
	// (and anti-spoofing), while it is; the loop is not ready then.
	Hooks string
	// Sources says what keeps a policy source from being complete (the
	// Calico informers have not listed), while it does; the loop is not
	// ready then.
	Sources string
	// Calico is the Calico API the loop reads, "" for none.
	Calico string
}

const syncKey = "policy"

// NewLoop returns a loop; Run starts it.
func NewLoop(cfg Config, client kubernetes.Interface, recorder record.EventRecorder) *Loop {
	if cfg.ResyncPeriod == 0 {
		cfg.ResyncPeriod = 5 * time.Second
	}
	if cfg.CalicoDetectPeriod == 0 {
		cfg.CalicoDetectPeriod = 10 * time.Second
	}
	if cfg.AcceptMark == 0 {
		cfg.AcceptMark = 0x10000
	}
	l := &Loop{
		cfg:          cfg,
		client:       client,
		recorder:     recorder,
		endpoints:    map[string]endpointapi.Endpoint{},
		appliedCh:    make(chan struct{}),
		policyCache:  map[string]cachedObject[*Policy]{},
		podCache:     map[string]cachedObject[*Pod]{},
		nsCache:      map[string]cachedObject[*Namespace]{},
		selectedKeys: map[string]bool{},
		netsetCache:  map[string]*NetworkSet{},
		invalid:      map[string]string{},
		refused:      map[string]string{},
		kernel:       make(chan []KernelState, 1),
		rereadNow:    make(chan struct{}, 1),
		cutFlows:     make(chan cutRequest, 1),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](50*time.Millisecond, 10*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "policy"}),
	}
	l.dirty.take()
	var renderers []*Renderer
	for _, fam := range iptables.Families(cfg.IPv4, cfg.IPv6) {
		renderers = append(renderers, &Renderer{IPv6: fam.Is6(), AcceptMark: cfg.AcceptMark, DropLog: cfg.DropLog})
	}
	l.state = newClusterState(renderers)
	return l
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
	if err := l.waitPodKnown(ctx, ep); err != nil {
		return err
	}
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
	s.NotProgrammed = maps.Clone(l.status.NotProgrammed)
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

// Ready reports whether the policy loop has programmed the node, hooks
// included: without them pod traffic would bypass policy.
func (l *Loop) Ready() bool {
	s := l.Status()
	return s.Ready && s.Hooks == "" && s.Sources == ""
}

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
	if err := l.buildFamilies(); err != nil {
		return err
	}
	// The re-reader and the connection cutter run in their own goroutines,
	// which must enter the namespace this one programs.
	netns, err := ns.GetCurrentNS()
	if err != nil {
		return fmt.Errorf("finding the network namespace to program: %w", err)
	}
	defer netns.Close()
	l.netns = netns

	factory, err := l.startInformers(ctx)
	if err != nil {
		return err
	}
	defer factory.Shutdown()

	// The first sync models everything the caches hold; later ones only
	// what the event handlers marked.
	if err := l.markAll(); err != nil {
		return err
	}
	l.queue.Add(syncKey)

	var helpers sync.WaitGroup
	helpers.Go(func() { l.runRereader(ctx) })
	helpers.Go(func() { l.runCutter(ctx) })
	helpers.Go(func() { l.runCalicoDetector(ctx, l.cfg.CalicoDetectPeriod) })
	go func() { <-ctx.Done(); l.queue.ShutDown() }()
	for l.processNext(ctx) {
	}
	helpers.Wait() // they use the namespace handle closed on return
	return nil
}

// WithCalico gives the loop the clients of the Calico APIs: the module's
// generated clientset for projectcalico.org/v3, and a dynamic client for
// a Canal cluster's crd.projectcalico.org/v1. Without them the loop reads
// networking/v1 policies only.
func (l *Loop) WithCalico(c calicoclient.Interface, d dynamic.Interface) *Loop {
	l.calicoClient, l.dynClient = c, d
	return l
}

// startInformers starts the informers of pods, namespaces, service
// accounts and every policy source, whose event handlers mark what
// changed and queue a sync, and waits for their caches.
func (l *Loop) startInformers(ctx context.Context) (informers.SharedInformerFactory, error) {
	factory := informers.NewSharedInformerFactoryWithOptions(l.client, 10*time.Minute, informers.WithTransform(slimObject))
	pods, nss, sas := factory.Core().V1().Pods(), factory.Core().V1().Namespaces(), factory.Core().V1().ServiceAccounts()
	nps := factory.Networking().V1().NetworkPolicies()
	l.sources = []*policySource{kubernetesSource(nps.Informer())}
	for _, w := range []watchSpec{
		{pods.Informer(), func(d *dirtyKeys, k string) { d.pods[k] = true }},
		{nss.Informer(), func(d *dirtyKeys, k string) { d.namespaces[k] = true }},
		{sas.Informer(), func(d *dirtyKeys, k string) { d.serviceAccounts[k] = true }},
		{nps.Informer(), func(d *dirtyKeys, k string) { d.policies[k] = true }},
	} {
		if err := l.watch(w.inf, w.dirty); err != nil {
			return nil, err
		}
	}
	l.pods, l.namespaces, l.serviceAccounts = pods.Lister(), nss.Lister(), sas.Lister()
	l.setPodLookup(pods.Lister(), pods.Informer().HasSynced)
	if err := l.startClusterNetworkPolicies(ctx, factory); err != nil {
		return nil, err
	}
	l.fixedSources = len(l.sources)
	api := l.detectCalico(ctx)
	l.mu.Lock()
	l.calicoWanted = api
	l.mu.Unlock()
	factory.Start(ctx.Done())
	if api != CalicoNone {
		l.startCalico(ctx, api) // lists beside the Kubernetes informers
	}
	factory.WaitForCacheSync(ctx.Done())
	l.waitClusterNetworkPolicies(ctx)
	if api != CalicoNone {
		l.finishCalico(ctx)
	}
	return factory, nil
}

// watch marks an informer's changed objects and queues a sync.
func (l *Loop) watch(inf cache.SharedIndexInformer, dirty func(*dirtyKeys, string)) error {
	mark := func(obj any) {
		key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
		if err != nil {
			return
		}
		l.mu.Lock()
		dirty(&l.dirty, key)
		l.mu.Unlock()
		l.queue.Add(syncKey)
	}
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: mark,
		UpdateFunc: func(old, obj any) {
			// The informers' periodic resync replays every object
			// unchanged: at 50,000 pods, a sync of them all for nothing.
			if !isResyncReplay(old, obj) {
				mark(obj)
			}
		},
		DeleteFunc: mark,
	})
	return err
}

// markAll marks every cached object changed. Event handlers may still be
// delivering the initial adds when the caches report synced, and the
// first sync must see everything.
func (l *Loop) markAll() error {
	pods, err := l.pods.List(labels.Everything())
	if err != nil {
		return err
	}
	nss, err := l.namespaces.List(labels.Everything())
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, p := range pods {
		l.dirty.pods[p.Namespace+"/"+p.Name] = true
	}
	for _, n := range nss {
		l.dirty.namespaces[n.Name] = true
	}
	l.markCalicoLocked()
	return nil
}

// runRereader re-reads the kernel every ResyncPeriod, and at once when a
// sync could not use a read because it wrote meanwhile.
func (l *Loop) runRereader(ctx context.Context) {
	t := time.NewTimer(l.cfg.ResyncPeriod)
	defer t.Stop()
	now := l.rereadNow
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-now:
		}
		began := time.Now()
		l.reread(ctx)
		pause := rereadPause(l.cfg.ResyncPeriod, time.Since(began))
		t.Reset(pause)
		// When reads are slow, a read that raced a write is not retried
		// at once either: during a burst of writes it would be rejected
		// again and again, a core spent on reads nobody can use.
		now = l.rereadNow
		if pause > l.cfg.ResyncPeriod {
			now = nil
		}
	}
}

// rereadPause is the wait before the next periodic re-read: the resync
// period, or ten times what the last read took when that is longer, so
// re-reading takes at most a tenth of a core. At 50,000 pods an
// iptables-save of 70,000 rules takes a second or more, and a re-read
// every 5 s took a good part of a 2-core node from the policy changes
// themselves; drift is then repaired within that longer pause.
func rereadPause(period, took time.Duration) time.Duration {
	return max(period, 10*took)
}

// reread reads the kernel's policy chains and sets, away from the sync
// goroutine, and hands the result to the next sync, which puts right what
// drifted (a deleted rule, chain or set comes back within ResyncPeriod).
func (l *Loop) reread(ctx context.Context) {
	began := time.Now()
	var states []KernelState
	err := l.netns.Do(func(ns.NetNS) error {
		for _, f := range l.families {
			k, err := f.dataplane.Read()
			if err != nil {
				return err
			}
			states = append(states, k)
		}
		return nil
	})
	if err != nil {
		klog.FromContext(ctx).Error(err, "re-reading the kernel's policy rules")
		return
	}
	klog.FromContext(ctx).V(4).Info("policy rules re-read", "ms", time.Since(began).Milliseconds())
	select {
	case <-l.kernel: // replaced by this newer read
	default:
	}
	l.kernel <- states
	l.queue.Add(syncKey)
}

// family is the policy loop's share of one IP family, as kube-proxy
// builds one single-family proxier per family: the rule writer, the
// dataplane, and what the loop knows of the family's hooks.
type family struct {
	iptables.Family
	ipt       contract.HookWriter
	dataplane *Dataplane
	// hooks is what the last re-read found of the jumps into the policy
	// chains; hooksWritten whether they were written since the agent
	// started; spoofDrops the anti-spoofing counter last read.
	hooks        hookState
	hooksWritten bool
	spoofDrops   uint64
}

// buildFamilies makes each configured family's rule writer and dataplane.
func (l *Loop) buildFamilies() error {
	for _, fam := range iptables.Families(l.cfg.IPv4, l.cfg.IPv6) {
		r, err := iptables.New(fam, l.cfg.IPTablesMode)
		if err != nil {
			return err
		}
		var w contract.HookWriter = r
		if l.writerHook != nil {
			w = l.writerHook(w)
		}
		f := &family{Family: fam, ipt: w, dataplane: NewDataplane(w, fam.Is6())}
		if l.dataplaneHook != nil {
			l.dataplaneHook(f.dataplane)
		}
		l.families = append(l.families, f)
	}
	return nil
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

// sync brings the model up to date with what changed, renders what that
// touches, and applies what differs from the kernel.
func (l *Loop) sync(ctx context.Context) error {
	t := syncTimes{began: time.Now()}
	defer func() {
		if d := time.Since(t.began); d > 100*time.Millisecond {
			klog.FromContext(ctx).V(2).Info("slow policy sync", "ms", d.Milliseconds())
		}
	}()
	l.mu.Lock()
	wanted := l.calicoWanted
	l.mu.Unlock()
	if wanted != l.calicoAPI {
		l.switchCalico(ctx, wanted)
	}
	repairing := l.adoptReread()
	gen, dirty, eps := l.takeChanges()
	inputChanged := !dirty.empty()
	journal.Default.SetCause("policy", syncCause(dirty, eps != nil, repairing))
	if err := l.updateModel(ctx, dirty); err != nil {
		// Converting again is harmless; losing a key would leave its
		// object unprogrammed until the informers' resync.
		l.mu.Lock()
		l.dirty.restore(dirty)
		l.mu.Unlock()
		return err
	}
	if eps != nil {
		l.state.SetEndpoints(eps)
	}
	l.seenEndpoint = gen

	t.modelled = time.Now()
	rulesets := l.state.Commit()
	if inputChanged || eps != nil || l.model.Load() == nil {
		l.saveModel()
	}
	t.rendered = time.Now()
	changed, failed, err := l.applyFamilies(ctx, rulesets, repairing, t)
	if err != nil {
		return err
	}
	if inputChanged && changed {
		// A change may stop allowing flows that conntrack would let
		// through as established: cut them, without holding up the
		// next change.
		pols, pods, namespaces, locals := l.state.Snapshot()
		l.requestCut(cutRequest{pols, pods, namespaces, locals, l.state.NetworkSets()})
	}
	l.publish(ctx, gen, failed)
	return nil
}

// syncTimes are when a sync began, finished the model and finished
// rendering, for the log line of what it wrote.
type syncTimes struct {
	began, modelled, rendered time.Time
}

// adoptReread takes a periodic re-read, if one is waiting: what it found
// wrong is put right by this sync's Apply. It reports whether it adopted
// one, so what the sync writes counts as a repair of drift.
func (l *Loop) adoptReread() (repairing bool) {
	select {
	case states := <-l.kernel:
		for i, f := range l.families {
			// A read that overlapped a write (chains, sets or hooks) may
			// show any part of it, its hooks too: it says nothing, read
			// again. Noting its hooks anyway took the hooks as flushed
			// after the first write at scale, and the next sync read and
			// rewrote everything.
			if !f.dataplane.Adopt(states[i]) {
				select {
				case l.rereadNow <- struct{}{}:
				default:
				}
				continue
			}
			l.noteHooks(f, states[i].hooks)
			repairing = true
		}
	default:
	}
	return repairing
}

// takeChanges takes the keys the event handlers marked, and the endpoint
// set when it changed since the model last saw it (nil otherwise), with
// its generation.
func (l *Loop) takeChanges() (gen uint64, dirty dirtyKeys, eps map[string]endpointapi.Endpoint) {
	l.mu.Lock()
	defer l.mu.Unlock()
	gen = l.wanted
	dirty = l.dirty.take()
	if gen != l.seenEndpoint {
		eps = maps.Clone(l.endpoints)
	}
	return gen, dirty, eps
}

// applyFamilies applies each family's ruleset and then its hooks. It
// reports whether anything was written, and the policy chains that fail
// closed.
func (l *Loop) applyFamilies(ctx context.Context, rulesets []*Ruleset, repairing bool, t syncTimes) (changed bool, failed []Failure, err error) {
	for i, f := range l.families {
		st, err := f.dataplane.Apply(rulesets[i])
		if err != nil {
			return changed, failed, err
		}
		failed = append(failed, st.Failed...)
		// After the chains, so a new node's first pod packet already
		// meets the endpoint dispatch when the jump to it appears.
		if err := l.ensureHooks(ctx, f); err != nil {
			return changed, failed, err
		}
		if !st.Changed() {
			continue
		}
		changed = true
		if repairing {
			metrics.DriftRepairs.WithLabelValues("policy-chain").Add(float64(st.ChainsWritten + st.ChainsDeleted))
			metrics.DriftRepairs.WithLabelValues("policy-ipset").Add(float64(st.SetsChanged + st.SetsDeleted))
		}
		klog.FromContext(ctx).V(2).Info("policy rules written", "ipv6", f.Is6(), "stats", st, "repair", repairing,
			"modelMs", t.modelled.Sub(t.began).Milliseconds(), "renderMs", t.rendered.Sub(t.modelled).Milliseconds(),
			"applyMs", time.Since(t.rendered).Milliseconds())
	}
	return changed, failed, nil
}

// publish reports an applied sync: the Events of policies the kernel
// refused or took again, the metrics, and the status, and it wakes the
// ProgramEndpoint calls that waited for generation gen.
func (l *Loop) publish(ctx context.Context, gen uint64, failed []Failure) {
	locals := l.state.LocalEndpoints()
	l.reportRefused(ctx, failed, locals)
	notProgrammed := maps.Clone(l.invalid)
	maps.Copy(notProgrammed, l.refused)
	metrics.PoliciesNotProgrammed.WithLabelValues("invalid").Set(float64(len(l.invalid)))
	metrics.PoliciesNotProgrammed.WithLabelValues("kernel").Set(float64(len(l.refused)))
	l.queueCNPStatus(notProgrammed)
	selected, epPolicies := l.publishSelected(locals)
	metrics.EndpointsProgrammed.Set(float64(len(locals)))
	metrics.PoliciesProgrammed.Set(float64(len(l.state.policies)))

	l.mu.Lock()
	if gen > l.applied {
		l.applied = gen
	}
	close(l.appliedCh)
	l.appliedCh = make(chan struct{})
	first := !l.status.Ready
	l.status = Status{Ready: true, Selected: selected, EndpointPolicies: epPolicies, LastSync: time.Now(), Endpoints: len(locals),
		NotProgrammed: notProgrammed, Hooks: l.hookProblems(), Sources: l.calicoProblem(), Calico: string(l.calicoAPI)}
	l.mu.Unlock()
	if first {
		klog.FromContext(ctx).Info("policy programmed", "endpoints", len(locals), "policies", len(l.state.policies), "pods", len(l.state.pods),
			"sinceStartMs", time.Since(l.started).Milliseconds())
	}
}

// publishSelected counts, per policy, the local endpoints it selects, and
// lists, per host veth, the policies selecting it; it keeps the
// per-policy gauge in line, dropping the series of policies that select
// nothing here any more.
func (l *Loop) publishSelected(locals []LocalEndpoint) (selected map[string]int, epPolicies map[string][]string) {
	selected = map[string]int{}
	epPolicies = map[string][]string{}
	for _, ep := range locals {
		all := uniqueSorted(append(slices.Clone(ep.Ingress), ep.Egress...))
		for _, k := range all {
			selected[k]++
		}
		epPolicies[ep.HostVeth] = all
	}
	for k := range l.selectedKeys {
		if _, ok := selected[k]; !ok {
			metrics.PolicyEndpoints.DeleteLabelValues(k)
			delete(l.selectedKeys, k)
		}
	}
	for k, n := range selected {
		metrics.PolicyEndpoints.WithLabelValues(k).Set(float64(n))
		l.selectedKeys[k] = true
	}
	return selected, epPolicies
}

// updateModel converts the changed objects into the model. Converting a
// policy (parsing its selectors) is the costly part, so an object is
// converted again only when its version changed.
func (l *Loop) updateModel(ctx context.Context, dirty dirtyKeys) error {
	if dirty.tiers && l.updateTiers(ctx) {
		// Every policy carries its tier: convert them all again.
		for _, src := range l.sources {
			for _, k := range src.informer.GetStore().ListKeys() {
				dirty.policies[src.prefix+k] = true
			}
		}
		for k := range l.state.policies {
			dirty.policies[k] = true
		}
	}
	for key := range dirty.policies {
		p, err := l.convertPolicy(ctx, key)
		if err != nil {
			return err
		}
		if p != nil && p.Broken != "" {
			l.invalid[key] = p.Broken
		} else {
			delete(l.invalid, key)
		}
		l.state.SetPolicy(key, p)
	}
	for key := range dirty.netsets {
		ns, err := l.convertNetSet(ctx, key)
		if err != nil {
			return err
		}
		if ns == nil || l.netsetCache[key] == nil || !sameNetSet(ns, l.netsetCache[key]) {
			l.netsetCache[key] = ns
			if ns == nil {
				delete(l.netsetCache, key)
			}
			l.state.SetNetworkSet(key, ns)
		}
	}
	for key := range dirty.namespaces {
		ns, err := refresh(l.nsCache, key, func() (*corev1.Namespace, error) { return l.namespaces.Get(key) },
			func(ns *corev1.Namespace) *Namespace { return &Namespace{Name: ns.Name, Labels: ns.Labels} })
		if err != nil {
			return err
		}
		l.state.SetNamespace(key, ns)
	}
	if err := l.markServiceAccountPods(dirty); err != nil {
		return err
	}
	for key := range dirty.pods {
		namespace, name, _ := cache.SplitMetaNamespaceKey(key)
		pod, err := refresh(l.podCache, key, func() (*corev1.Pod, error) { return l.pods.Pods(namespace).Get(name) }, l.modelPod)
		if err != nil {
			return err
		}
		l.state.SetPod(key, pod)
	}
	return nil
}

// markServiceAccountPods marks the pods of changed service accounts, and
// forgets their cached models: a pod's model carries its account's labels.
func (l *Loop) markServiceAccountPods(dirty dirtyKeys) error {
	for key := range dirty.serviceAccounts {
		namespace, name, _ := cache.SplitMetaNamespaceKey(key)
		pods, err := l.pods.Pods(namespace).List(labels.Everything())
		if err != nil {
			return err
		}
		for _, p := range pods {
			if serviceAccountOf(p) == name {
				k := p.Namespace + "/" + p.Name
				delete(l.podCache, k)
				dirty.pods[k] = true
			}
		}
	}
	return nil
}

func serviceAccountOf(p *corev1.Pod) string {
	if p.Spec.ServiceAccountName == "" {
		return "default"
	}
	return p.Spec.ServiceAccountName
}

func sameNetSet(a, b *NetworkSet) bool {
	return a.Key == b.Key && a.Namespace == b.Namespace && maps.Equal(a.Labels, b.Labels) && slices.Equal(a.Nets, b.Nets)
}

// refresh returns the model of an object from the informer cache, nil if
// it is gone, converting it only when its version changed.
func refresh[O metav1.Object, M any](models map[string]cachedObject[*M], key string, get func() (O, error), convert func(O) *M) (*M, error) {
	obj, err := get()
	if apierrors.IsNotFound(err) {
		delete(models, key)
		return nil, nil
	} else if err != nil {
		return nil, err
	}
	version := objectVersion(obj)
	c, ok := models[key]
	if !ok || version == "" || c.version != version {
		c = cachedObject[*M]{version, convert(obj)}
		models[key] = c
	}
	return c.model, nil
}

// objectVersion identifies an object's content: the API server changes
// the resourceVersion on every write. Empty means unknown (never cached).
func objectVersion(obj metav1.Object) string {
	if obj.GetResourceVersion() == "" {
		return ""
	}
	return string(obj.GetUID()) + "/" + obj.GetResourceVersion()
}

func (l *Loop) reportBroken(ctx context.Context, obj runtime.Object, key, why string) {
	klog.FromContext(ctx).Info("policy cannot be rendered; it fails closed for the pods it selects", "policy", key, "problem", why)
	l.report(ctx, obj, corev1.EventTypeWarning, "PolicyNotRendered", fmt.Sprintf("sluice on %s cannot render this policy (%s); the pods it selects fail closed", l.cfg.NodeName, why))
}

const corev1Warning = corev1.EventTypeWarning

// report records an Event on an informer object.
func (l *Loop) report(_ context.Context, obj any, typ, reason, msg string) {
	ro, ok := obj.(runtime.Object)
	if l.recorder == nil || !ok {
		return
	}
	l.recorder.Event(ro, typ, reason, msg)
}

// modelPod converts a pod, or returns nil for one without a pod IP of its
// own (hostNetwork) or that has finished.
func (l *Loop) modelPod(p *corev1.Pod) *Pod {
	if p.Spec.HostNetwork || p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return nil
	}
	m := &Pod{Namespace: p.Namespace, Name: p.Name, Labels: p.Labels, NamedPorts: map[string]NamedPort{}, ServiceAccount: serviceAccountOf(p)}
	if l.serviceAccounts != nil {
		if sa, err := l.serviceAccounts.ServiceAccounts(p.Namespace).Get(m.ServiceAccount); err == nil {
			m.ServiceAccountLabels = sa.Labels
		}
	}
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

// reportRefused turns the dataplanes' failures into per-policy reasons,
// and reports each change once: a Warning Event PolicyNotRendered naming
// the field and the reason when a policy starts failing closed, a Normal
// Event PolicyProgrammed when it is programmed again.
func (l *Loop) reportRefused(ctx context.Context, failed []Failure, locals []LocalEndpoint) {
	now := map[string]string{}
	for _, f := range failed {
		u, ok := l.chainOwner(f.Chain, locals)
		if _, dup := now[u.key]; !ok || dup {
			continue
		}
		now[u.key] = l.refusalReason(u, f)
	}
	logger := klog.FromContext(ctx)
	for key, why := range now {
		if l.refused[key] == why {
			continue
		}
		logger.Info("the kernel refused a policy; its pods allow nothing it would have allowed", "policy", key, "problem", why)
		l.policyEvent(key, corev1.EventTypeWarning, "PolicyNotRendered",
			fmt.Sprintf("sluice on %s cannot program this policy (%s); the pods it selects fail closed", l.cfg.NodeName, why))
	}
	for key := range l.refused {
		if _, still := now[key]; !still {
			logger.Info("policy programmed again", "policy", key)
			l.policyEvent(key, corev1.EventTypeNormal, "PolicyProgrammed", fmt.Sprintf("sluice on %s programmed this policy", l.cfg.NodeName))
		}
	}
	l.refused = now
}

// chainOwner finds the policy and direction of a policy chain. Chain names
// are a hash of the key, so the answer never goes stale and is kept: a
// node with a refused policy hashes the local endpoints' policies once,
// not on every sync.
func (l *Loop) chainOwner(chain string, locals []LocalEndpoint) (policyChainRef, bool) {
	if u, ok := l.chainOwners[chain]; ok {
		return u, true
	}
	if l.chainOwners == nil {
		l.chainOwners = map[string]policyChainRef{}
	}
	for _, ep := range locals {
		for _, dir := range []struct {
			keys   []string
			egress bool
		}{{ep.Ingress, false}, {ep.Egress, true}} {
			for _, k := range dir.keys {
				l.chainOwners[PolicyChain(k, dir.egress)] = policyChainRef{k, dir.egress}
			}
		}
	}
	u, ok := l.chainOwners[chain]
	return u, ok
}

// refusalReason says what in a policy the kernel refused.
func (l *Loop) refusalReason(u policyChainRef, f Failure) string {
	reason, _, _ := strings.Cut(f.Reason, "\n") // iptables-restore quotes the payload after
	if f.Set == "" {
		return "the kernel refused its rules: " + reason
	}
	field := ""
	if p := l.state.policies[u.key]; p != nil {
		for _, fam := range l.state.families {
			if field = fam.r.SetField(p, u.egress, f.Set); field != "" {
				break
			}
		}
	}
	if field == "" {
		return fmt.Sprintf("ipset %s could not be written: %s", f.Set, reason)
	}
	return fmt.Sprintf("%s: ipset %s could not be written: %s", field, f.Set, reason)
}

// policyEvent records an Event on a policy, if it still exists.
func (l *Loop) policyEvent(key, typ, reason, msg string) {
	obj, err := l.object(key)
	if err != nil || obj == nil || l.recorder == nil {
		return
	}
	l.recorder.Event(obj, typ, reason, msg)
}

// noteHooks takes what a re-read found of one family's hooks.
func (l *Loop) noteHooks(f *family, hs hookState) {
	if hs.flushed {
		// The writer's belief is void: read everything again.
		f.dataplane.chains = nil
	}
	f.hooks = hs
	last := f.spoofDrops
	switch {
	case hs.problem != "":
	case hs.spoofDrops >= last:
		metrics.SpoofedPacketsDropped.WithLabelValues(f.String()).Add(float64(hs.spoofDrops - last))
		f.spoofDrops = hs.spoofDrops
	default: // the rule was written again: its counter restarted
		metrics.SpoofedPacketsDropped.WithLabelValues(f.String()).Add(float64(hs.spoofDrops))
		f.spoofDrops = hs.spoofDrops
	}
}

// ensureHooks writes one family's hooks when the agent starts and when a
// re-read found them wrong.
func (l *Loop) ensureHooks(ctx context.Context, f *family) error {
	hs := f.hooks
	if f.hooksWritten && hs.problem == "" {
		return nil
	}
	// A re-read beside this write must not be adopted (Dataplane.Adopt).
	f.dataplane.gen.Add(1)
	err := applyHooks(f.ipt)
	f.dataplane.gen.Add(1)
	if err != nil {
		if hs.problem == "" {
			hs.problem = "not written yet"
		}
		f.hooks = hs
		return fmt.Errorf("writing the jumps into the policy chains: %w", err)
	}
	if f.hooksWritten {
		klog.FromContext(ctx).Info("policy hooks repaired", "ipv6", f.Is6(), "problem", hs.problem)
		metrics.DriftRepairs.WithLabelValues("policy-hook").Inc()
	}
	if hs.problem != "" {
		f.spoofDrops = 0 // written again: the counter starts over
	}
	f.hooksWritten = true
	f.hooks = hookState{spoofDrops: hs.spoofDrops}
	return nil
}

// hookProblems says what is wrong with the hooks of any family.
func (l *Loop) hookProblems() string {
	var out []string
	for _, f := range l.families {
		if p := f.hooks.problem; p != "" {
			out = append(out, f.String()+": "+p)
		}
	}
	return strings.Join(out, "; ")
}
