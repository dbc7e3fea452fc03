package policy

// This file is where policy comes from: one source per API kind, each an
// informer of the kind's generated (or, for Canal's v1 CRDs, dynamic)
// informer factory, the conversion into the model, and the object that
// Events name. The loop only sees model keys: networking/v1 policies keep
// "namespace/name", the other kinds carry their kind as a prefix.

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	calicoclient "github.com/projectcalico/api/pkg/client/clientset_generated/clientset"
	calicoinformers "github.com/projectcalico/api/pkg/client/informers_generated/externalversions"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
)

func init() {
	// Events name Calico objects by their kind, which the recorder finds
	// in client-go's scheme.
	_ = v3.AddToScheme(scheme.Scheme)
}

// CalicoAPI says which Calico API a cluster stores policies in.
type CalicoAPI string

const (
	// CalicoNone: no Calico CRDs; only networking/v1 policies.
	CalicoNone CalicoAPI = ""
	// CalicoV3: projectcalico.org/v3, Sluice's own CRDs.
	CalicoV3 CalicoAPI = "projectcalico.org/v3"
	// CanalV1: crd.projectcalico.org/v1, where a Canal cluster's
	// calicoctl wrote the same specs.
	CanalV1 CalicoAPI = "crd.projectcalico.org/v1"
)

// DetectCalicoAPI finds the Calico API to read: Sluice's v3 CRDs when
// they exist, else Canal's v1 ones. While both exist, v1 stays the source
// until v3 holds every policy v1 holds (v3Covers), so that installing
// Sluice's CRDs in a Canal cluster and copying the policies over, in any
// order, never leaves a policy unenforced (README, "Migrating from
// Canal").
func DetectCalicoAPI(d discovery.DiscoveryInterface, v3Covers func() bool) CalicoAPI {
	has := func(api CalicoAPI) bool {
		rl, err := d.ServerResourcesForGroupVersion(string(api))
		if err != nil {
			return false
		}
		for _, r := range rl.APIResources {
			if r.Name == "networkpolicies" {
				return true
			}
		}
		return false
	}
	v3, v1 := has(CalicoV3), has(CanalV1)
	switch {
	case v3 && (!v1 || v3Covers()):
		return CalicoV3
	case v1:
		return CanalV1
	}
	return CalicoNone
}

// v3Covers reports whether projectcalico.org/v3 holds a NetworkPolicy or
// GlobalNetworkPolicy of every namespace and name that Canal's
// crd.projectcalico.org/v1 holds, and at least one.
func (l *Loop) v3Covers(ctx context.Context) func() bool {
	return func() bool {
		if l.calicoClient == nil || l.dynClient == nil {
			return false
		}
		var v3Keys []string
		np, err1 := l.calicoClient.ProjectcalicoV3().NetworkPolicies("").List(ctx, metav1.ListOptions{})
		gnp, err2 := l.calicoClient.ProjectcalicoV3().GlobalNetworkPolicies().List(ctx, metav1.ListOptions{})
		if err1 != nil || err2 != nil {
			return false
		}
		for _, p := range np.Items {
			v3Keys = append(v3Keys, "np/"+p.Namespace+"/"+p.Name)
		}
		for _, p := range gnp.Items {
			v3Keys = append(v3Keys, "gnp/"+p.Name)
		}
		if len(v3Keys) == 0 {
			return false
		}
		for kind, resource := range map[string]string{"np": "networkpolicies", "gnp": "globalnetworkpolicies"} {
			gvr := schema.GroupVersionResource{Group: "crd.projectcalico.org", Version: "v1", Resource: resource}
			list, err := l.dynClient.Resource(gvr).List(ctx, metav1.ListOptions{})
			if err != nil {
				return false
			}
			for _, o := range list.Items {
				key := kind + "/" + o.GetName()
				if kind == "np" {
					key = kind + "/" + o.GetNamespace() + "/" + o.GetName()
				}
				if !slices.Contains(v3Keys, key) {
					return false
				}
			}
		}
		return true
	}
}

// detectCalico is the Calico API the loop should read now.
func (l *Loop) detectCalico(ctx context.Context) CalicoAPI {
	if l.calicoClient == nil && l.dynClient == nil {
		return CalicoNone
	}
	return DetectCalicoAPI(l.client.Discovery(), l.v3Covers(ctx))
}

// runCalicoDetector looks for a change of Calico API every period: CRDs
// installed after the agent, or a finished migration from Canal. The sync
// goroutine makes the switch (switchCalico).
func (l *Loop) runCalicoDetector(ctx context.Context, period time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		api := l.detectCalico(ctx)
		l.mu.Lock()
		changed := api != l.calicoWanted
		l.calicoWanted = api
		l.mu.Unlock()
		if changed {
			l.queue.Add(syncKey)
		}
	}
}

// switchCalico reads from another Calico API: it stops the old informers,
// starts the new, and marks every policy, network set and tier changed.
func (l *Loop) switchCalico(ctx context.Context, api CalicoAPI) {
	l.startCalico(ctx, api)
	l.finishCalico(ctx)
}

// startCalico stops the old Calico informers and starts the new ones,
// without waiting for them: at start the loop waits for them and the
// Kubernetes informers together.
func (l *Loop) startCalico(ctx context.Context, api CalicoAPI) {
	logger := klog.FromContext(ctx)
	if l.calico != nil {
		close(l.calico.stop)
	}
	l.calico, l.calicoAPI = nil, api
	l.sources = l.sources[:l.fixedSources] // networking/v1 and ClusterNetworkPolicy stay
	switch {
	case api == CalicoV3 && l.calicoClient != nil:
		l.calico = v3Sources(l.calicoClient, 10*time.Minute)
	case api == CanalV1 && l.dynClient != nil:
		l.calico = canalSources(l.dynClient, 10*time.Minute)
	}
	logger.Info("policy sources", "calico", string(api))
	if l.calico == nil {
		return
	}
	l.sources = append(l.sources, l.calico.policies...)
	for _, w := range l.calico.watches() {
		if err := l.watch(w.inf, w.dirty); err != nil {
			logger.Error(err, "watching a Calico kind")
		}
	}
	l.calico.start(l.calico.stop)
}

// finishCalico waits for the Calico informers, makes the default tier,
// and marks every policy, network set and tier changed.
func (l *Loop) finishCalico(ctx context.Context) {
	logger := klog.FromContext(ctx)
	if l.calico != nil {
		// Bounded: informers that cannot list (a ClusterRole without the
		// Calico kinds) must not hold up the Kubernetes policies. The
		// loop is not ready while they have not synced (calicoProblem).
		waitCtx, cancel := context.WithTimeout(ctx, calicoSyncTimeout)
		l.calico.wait(waitCtx.Done())
		cancel()
		if p := l.calico.problem(); p != "" {
			logger.Error(nil, "Calico informers not synced; Calico policies are not enforced until they are", "problem", p)
		}
		if l.calico.createDefaultTier != nil {
			if err := l.calico.createDefaultTier(ctx); err != nil {
				// Until it exists the agent applies it as Calico installs
				// it.
				logger.Error(err, "creating the default tier")
			}
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for k := range l.state.policies {
		l.dirty.policies[k] = true
	}
	for k := range l.state.netsets {
		l.dirty.netsets[k] = true
	}
	l.markCalicoLocked()
}

// watchSpec is an informer and how its changes are marked.
type watchSpec struct {
	inf   cache.SharedIndexInformer
	dirty func(*dirtyKeys, string)
}

// watches are the Calico informers and how their changes are marked.
func (c *calicoSources) watches() []watchSpec {
	out := []watchSpec{{c.tiers, func(d *dirtyKeys, _ string) { d.tiers = true }}}
	for _, ns := range c.netsets {
		prefix := ns.prefix
		out = append(out, watchSpec{ns.informer, func(d *dirtyKeys, k string) { d.netsets[prefix+k] = true }})
	}
	for _, src := range c.policies {
		prefix := src.prefix
		out = append(out, watchSpec{src.informer, func(d *dirtyKeys, k string) { d.policies[prefix+k] = true }})
	}
	return out
}

// markCalicoLocked marks every object of the Calico informers changed.
func (l *Loop) markCalicoLocked() {
	for _, src := range l.sources {
		for _, k := range src.informer.GetStore().ListKeys() {
			l.dirty.policies[src.prefix+k] = true
		}
	}
	for _, ns := range l.calicoNetsets() {
		for _, k := range ns.informer.GetStore().ListKeys() {
			l.dirty.netsets[ns.prefix+k] = true
		}
	}
	l.dirty.tiers = true
}

// policySource is one kind of policy.
type policySource struct {
	// prefix is the kind's model key prefix ("" for networking/v1).
	prefix   string
	informer cache.SharedIndexInformer
	// convert turns an informer object into the model.
	convert func(obj any, tiers TierLookup) (*Policy, error)
}

// netSetSource is one kind of network set.
type netSetSource struct {
	prefix   string
	informer cache.SharedIndexInformer
	global   bool
}

// calicoSources are the informers of one Calico API.
type calicoSources struct {
	policies []*policySource
	netsets  []*netSetSource
	tiers    cache.SharedIndexInformer
	// stop ends the informers when the loop switches API.
	stop  chan struct{}
	start func(stop <-chan struct{})
	wait  func(stop <-chan struct{})
	// create makes the default tier when it is missing (v3 only).
	createDefaultTier func(ctx context.Context) error
}

// decode returns an informer object as its typed form: itself, or, from
// a dynamic informer, its JSON read into the type (the same decoder the
// typed clients use).
func decode[T any](obj any) (*T, error) {
	switch o := obj.(type) {
	case *T:
		return o, nil
	case *unstructured.Unstructured:
		b, err := json.Marshal(o.Object)
		if err != nil {
			return nil, err
		}
		var t T
		if err := json.Unmarshal(b, &t); err != nil {
			return nil, fmt.Errorf("the object does not decode: %w", err)
		}
		return &t, nil
	}
	return nil, fmt.Errorf("unexpected object %T", obj)
}

// v3Sources are the projectcalico.org/v3 informers, from the module's
// generated factory.
func v3Sources(client calicoclient.Interface, resync time.Duration) *calicoSources {
	f := calicoinformers.NewSharedInformerFactory(client, resync)
	c := f.Projectcalico().V3()
	return &calicoSources{
		policies: calicoPolicySources(c.NetworkPolicies().Informer(), c.GlobalNetworkPolicies().Informer(), c.StagedNetworkPolicies().Informer(),
			c.StagedGlobalNetworkPolicies().Informer(), c.StagedKubernetesNetworkPolicies().Informer()),
		netsets: []*netSetSource{{prefix: "NetworkSet/", informer: c.NetworkSets().Informer()},
			{prefix: "GlobalNetworkSet/", informer: c.GlobalNetworkSets().Informer(), global: true}},
		tiers: c.Tiers().Informer(),
		stop:  make(chan struct{}),
		start: f.Start,
		wait:  func(stop <-chan struct{}) { f.WaitForCacheSync(stop) },
		createDefaultTier: func(ctx context.Context) error {
			order, action := float64(DefaultTierOrder), v3.Deny
			t := &v3.Tier{ObjectMeta: metav1.ObjectMeta{Name: DefaultTierName}, Spec: v3.TierSpec{Order: &order, DefaultAction: &action}}
			_, err := client.ProjectcalicoV3().Tiers().Create(ctx, t, metav1.CreateOptions{})
			if apierrors.IsAlreadyExists(err) {
				return nil
			}
			return err
		},
	}
}

// canalSources are the crd.projectcalico.org/v1 informers of a Canal
// cluster, from client-go's dynamic informer factory: the same specs, so
// the same conversions after decoding.
func canalSources(client dynamic.Interface, resync time.Duration) *calicoSources {
	f := dynamicinformer.NewDynamicSharedInformerFactory(client, resync)
	inf := func(resource string) cache.SharedIndexInformer {
		return f.ForResource(schema.GroupVersionResource{Group: "crd.projectcalico.org", Version: "v1", Resource: resource}).Informer()
	}
	return &calicoSources{
		policies: calicoPolicySources(inf("networkpolicies"), inf("globalnetworkpolicies"), inf("stagednetworkpolicies"),
			inf("stagedglobalnetworkpolicies"), inf("stagedkubernetesnetworkpolicies")),
		netsets: []*netSetSource{{prefix: "NetworkSet/", informer: inf("networksets")},
			{prefix: "GlobalNetworkSet/", informer: inf("globalnetworksets"), global: true}},
		tiers: inf("tiers"),
		stop:  make(chan struct{}),
		start: f.Start,
		wait:  func(stop <-chan struct{}) { f.WaitForCacheSync(stop) },
	}
}

func calicoPolicySources(np, gnp, snp, sgnp, sknp cache.SharedIndexInformer) []*policySource {
	return []*policySource{
		{prefix: CalicoNetworkPolicyKey, informer: np, convert: func(obj any, tiers TierLookup) (*Policy, error) {
			o, err := decode[v3.NetworkPolicy](obj)
			if err != nil {
				return nil, err
			}
			return FromCalicoNetworkPolicy(o, tiers), nil
		}},
		{prefix: CalicoGlobalNetworkPolicyKey, informer: gnp, convert: func(obj any, tiers TierLookup) (*Policy, error) {
			o, err := decode[v3.GlobalNetworkPolicy](obj)
			if err != nil {
				return nil, err
			}
			return FromCalicoGlobalNetworkPolicy(o, tiers), nil
		}},
		{prefix: StagedNetworkPolicyKey, informer: snp, convert: func(obj any, tiers TierLookup) (*Policy, error) {
			o, err := decode[v3.StagedNetworkPolicy](obj)
			if err != nil {
				return nil, err
			}
			return FromStagedNetworkPolicy(o, tiers), nil
		}},
		{prefix: StagedGlobalNetworkPolicyKey, informer: sgnp, convert: func(obj any, tiers TierLookup) (*Policy, error) {
			o, err := decode[v3.StagedGlobalNetworkPolicy](obj)
			if err != nil {
				return nil, err
			}
			return FromStagedGlobalNetworkPolicy(o, tiers), nil
		}},
		{prefix: StagedKubernetesNetworkPolicy, informer: sknp, convert: func(obj any, _ TierLookup) (*Policy, error) {
			o, err := decode[v3.StagedKubernetesNetworkPolicy](obj)
			if err != nil {
				return nil, err
			}
			return FromStagedKubernetesNetworkPolicy(o), nil
		}},
	}
}

// kubernetesSource is networking/v1 NetworkPolicy, in the default tier.
func kubernetesSource(informer cache.SharedIndexInformer) *policySource {
	return &policySource{informer: informer, convert: func(obj any, tiers TierLookup) (*Policy, error) {
		np, ok := obj.(*networkingv1.NetworkPolicy)
		if !ok {
			return nil, fmt.Errorf("unexpected object %T", obj)
		}
		p := FromNetworkPolicy(np)
		if t := tiers(DefaultTierName); t != nil {
			p.Tier = t
		}
		return p, nil
	}}
}

// undecodable is the model of an object that does not decode (a Canal
// object its CRDs stored but the v3 types refuse). It fails closed for
// whom it selects, read field by field where that still works; what
// cannot be read selects every endpoint in its scope.
func undecodable(key string, obj any, err error) *Policy {
	all, _ := ParseCalicoSelector("all()")
	p := &Policy{Key: key, Name: key, Order: NoOrder, PodSelector: all, Ingress: true, Egress: true}
	if m, ok := obj.(metav1.Object); ok {
		p.Namespace, p.Name = m.GetNamespace(), m.GetName()
	}
	if u, ok := obj.(*unstructured.Unstructured); ok {
		if s, found, _ := unstructured.NestedString(u.Object, "spec", "selector"); found {
			if sel, err := ParseCalicoSelector(s); err == nil && !strings.Contains(s, "global(") {
				p.PodSelector = sel
			}
		}
		if s, found, _ := unstructured.NestedString(u.Object, "spec", "namespaceSelector"); found && p.Namespace == "" && s != "" {
			if sel, err := ParseCalicoSelector(s); err == nil {
				p.NamespaceSelector = sel
			}
		}
		if types, found, _ := unstructured.NestedStringSlice(u.Object, "spec", "types"); found && len(types) > 0 {
			p.Ingress, p.Egress = slices.Contains(types, "Ingress"), slices.Contains(types, "Egress")
			if !p.Ingress && !p.Egress {
				p.Ingress, p.Egress = true, true
			}
		}
	}
	return p.failClosed(fmt.Errorf("spec: %w", err))
}

// sourceOf finds the source of a model key.
func (l *Loop) sourceOf(key string) (*policySource, string) {
	for _, s := range l.sources {
		if s.prefix != "" && strings.HasPrefix(key, s.prefix) {
			return s, strings.TrimPrefix(key, s.prefix)
		}
	}
	if strings.Contains(key, ".projectcalico.org/") {
		return nil, "" // a Calico kind the loop no longer reads
	}
	for _, s := range l.sources {
		if s.prefix == "" {
			return s, key
		}
	}
	return nil, ""
}

// object returns the informer object of a model key, nil when gone.
func (l *Loop) object(key string) (runtime.Object, error) {
	s, k := l.sourceOf(key)
	if s == nil {
		return nil, nil
	}
	obj, ok, err := s.informer.GetIndexer().GetByKey(k)
	if err != nil || !ok {
		return nil, err
	}
	ro, _ := obj.(runtime.Object)
	return ro, nil
}

// convertPolicy returns a key's model from its source's cache, nil when
// it is gone, converting it only when its version changed.
func (l *Loop) convertPolicy(ctx context.Context, key string) (*Policy, error) {
	s, k := l.sourceOf(key)
	if s == nil {
		return nil, nil
	}
	obj, ok, err := s.informer.GetIndexer().GetByKey(k)
	if err != nil {
		return nil, err
	}
	if !ok {
		delete(l.policyCache, key)
		return nil, nil
	}
	m, isMeta := obj.(metav1.Object)
	if !isMeta {
		return nil, fmt.Errorf("policy %s: unexpected object %T", key, obj)
	}
	version := objectVersion(m)
	if c, ok := l.policyCache[key]; ok && version != "" && c.version == version {
		return c.model, nil
	}
	p, err := s.convert(obj, l.tierLookup)
	if err != nil {
		p = undecodable(key, obj, err)
	}
	p.Key = key
	if p.Broken != "" {
		if ro, ok := obj.(runtime.Object); ok {
			l.reportBroken(ctx, ro, key, p.Broken)
		}
	}
	l.policyCache[key] = cachedObject[*Policy]{version, p}
	return p, nil
}

// tierLookup finds a tier for conversion: the cluster's, or the default
// tier as Calico installs it until the object exists.
func (l *Loop) tierLookup(name string) *Tier {
	if t, ok := l.tiers[name]; ok {
		return t
	}
	if name == DefaultTierName {
		return defaultTier
	}
	return nil
}

// updateTiers re-reads the tiers. A change of tiers re-converts every
// policy (they carry their tier), which is rare.
func (l *Loop) updateTiers(ctx context.Context) bool {
	if l.calico == nil {
		return false
	}
	tiers := map[string]*Tier{}
	for _, obj := range l.calico.tiers.GetStore().List() {
		t, err := decode[v3.Tier](obj)
		if err != nil {
			klog.FromContext(ctx).Error(err, "a tier does not decode; its policies fail closed")
			continue
		}
		m, err := FromTier(t)
		if err != nil {
			l.report(ctx, obj, corev1Warning, "TierInvalid", fmt.Sprintf("sluice on %s: %v; the tier drops what its policies do not decide", l.cfg.NodeName, err))
		}
		tiers[t.Name] = m
	}
	if tiersEqual(tiers, l.tiers) {
		return false
	}
	l.tiers = tiers
	clear(l.policyCache)
	return true
}

func tiersEqual(a, b map[string]*Tier) bool {
	if len(a) != len(b) {
		return false
	}
	for k, t := range a {
		if u, ok := b[k]; !ok || *u != *t {
			return false
		}
	}
	return true
}

// convertNetSet returns a network set's model, nil when gone.
func (l *Loop) convertNetSet(ctx context.Context, key string) (*NetworkSet, error) {
	if name, ok := strings.CutPrefix(key, NodeNetworkSetKey); ok {
		return l.convertNode(name)
	}
	for _, s := range l.calicoNetsets() {
		k, ok := strings.CutPrefix(key, s.prefix)
		if !ok {
			continue
		}
		obj, exists, err := s.informer.GetIndexer().GetByKey(k)
		if err != nil || !exists {
			return nil, err
		}
		var ns *NetworkSet
		if s.global {
			o, err := decode[v3.GlobalNetworkSet](obj)
			if err != nil {
				return nil, err
			}
			ns, err = FromNetworkSet("", o.Name, o.Labels, o.Spec.Nets)
			l.reportNetSet(ctx, obj, err)
		} else {
			o, err := decode[v3.NetworkSet](obj)
			if err != nil {
				return nil, err
			}
			ns, err = FromNetworkSet(o.Namespace, o.Name, o.Labels, o.Spec.Nets)
			l.reportNetSet(ctx, obj, err)
		}
		ns.Key = key
		return ns, nil
	}
	return nil, nil
}

func (l *Loop) reportNetSet(ctx context.Context, obj any, err error) {
	if err == nil {
		return
	}
	klog.FromContext(ctx).Info("network set has nets that do not parse; they are left out", "problem", err)
	l.report(ctx, obj, corev1Warning, "NetworkSetInvalid", fmt.Sprintf("sluice on %s leaves out nets it cannot parse: %v", l.cfg.NodeName, strings.ReplaceAll(err.Error(), "\n", "; ")))
}

func (l *Loop) calicoNetsets() []*netSetSource {
	if l.calico == nil {
		return nil
	}
	return l.calico.netsets
}

// calicoSyncTimeout bounds the wait for the Calico informers' first list
// (a variable for tests).
var calicoSyncTimeout = 20 * time.Second

// problem says which Calico informers have not synced yet, "" when all
// have.
func (c *calicoSources) problem() string {
	missing := 0
	for _, w := range c.watches() {
		if !w.inf.HasSynced() {
			missing++
		}
	}
	if missing == 0 {
		return ""
	}
	return fmt.Sprintf("%d Calico informers have not listed yet (RBAC for the Calico kinds?)", missing)
}

// calicoProblem is what keeps the Calico sources from being complete.
func (l *Loop) calicoProblem() string {
	if l.calico == nil {
		return ""
	}
	return l.calico.problem()
}
