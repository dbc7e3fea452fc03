package policy

// The ClusterNetworkPolicy source: an informer of the module's typed
// clientset (policy.networking.k8s.io/v1beta1, the version the CRD
// stores), nodes for the nodes peers, and the status conditions that say
// on which nodes each policy is programmed.

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	metav1ac "k8s.io/client-go/applyconfigurations/meta/v1"
	"k8s.io/client-go/informers"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
	cnpv1beta1 "sigs.k8s.io/network-policy-api/apis/v1beta1"
	cnpac "sigs.k8s.io/network-policy-api/pkg/client/applyconfiguration/apis/v1beta1"
	cnpclient "sigs.k8s.io/network-policy-api/pkg/client/clientset/versioned"
	cnpinformers "sigs.k8s.io/network-policy-api/pkg/client/informers/externalversions"
)

// cnpSources are the ClusterNetworkPolicy informer, the node lister and
// the status writer's state.
type cnpSources struct {
	client   cnpclient.Interface
	informer cache.SharedIndexInformer
	nodes    corelisters.NodeLister
	// status carries the latest not-programmed reasons to the writer.
	status chan map[string]string
	// written is the condition last applied per policy name (only the
	// writer goroutine touches it).
	written map[string]string
}

// WithClusterNetworkPolicies makes the loop read ClusterNetworkPolicies
// through c. Without it the loop reads none.
func (l *Loop) WithClusterNetworkPolicies(c cnpclient.Interface) *Loop {
	l.cnp = &cnpSources{client: c, status: make(chan map[string]string, 1), written: map[string]string{}}
	return l
}

// startClusterNetworkPolicies adds the source and the node informer (on
// the Kubernetes factory, before it starts) and starts the status writer.
// The informer is started even when the CRD is not installed yet: its
// reflector lists again until the CRD exists, and the policies then
// arrive as adds.
func (l *Loop) startClusterNetworkPolicies(ctx context.Context, factory informers.SharedInformerFactory) error {
	if l.cnp == nil {
		return nil
	}
	f := cnpinformers.NewSharedInformerFactory(l.cnp.client, 10*time.Minute)
	l.cnp.informer = f.Policy().V1beta1().ClusterNetworkPolicies().Informer()
	nodes := factory.Core().V1().Nodes()
	l.cnp.nodes = nodes.Lister()
	l.sources = append(l.sources, &policySource{prefix: ClusterNetworkPolicyKey, informer: l.cnp.informer, convert: convertCNP})
	if err := l.watch(nodes.Informer(), func(d *dirtyKeys, k string) { d.netsets[NodeNetworkSetKey+k] = true }); err != nil {
		return err
	}
	mark := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			l.mu.Lock()
			l.dirty.policies[ClusterNetworkPolicyKey+key] = true
			l.mu.Unlock()
			l.queue.Add(syncKey)
		}
	}
	if _, err := l.cnp.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: mark,
		UpdateFunc: func(old, obj any) {
			// Every agent writes its condition into the status: those
			// writes change no spec (the generation stays), and must not
			// make every agent convert and render the policy again.
			o, ok1 := old.(*cnpv1beta1.ClusterNetworkPolicy)
			n, ok2 := obj.(*cnpv1beta1.ClusterNetworkPolicy)
			if ok1 && ok2 && o.Generation == n.Generation && o.Generation != 0 {
				return
			}
			mark(obj)
		},
		DeleteFunc: mark,
	}); err != nil {
		return err
	}
	f.Start(ctx.Done())
	go l.runCNPStatusWriter(ctx)
	return nil
}

// waitClusterNetworkPolicies waits for the first list, bounded like the
// Calico informers' (a cluster without the CRD must not hold up the
// other policies), and marks every policy and node changed: event
// handlers may still be delivering the initial adds.
func (l *Loop) waitClusterNetworkPolicies(ctx context.Context) {
	if l.cnp == nil {
		return
	}
	waitCtx, cancel := context.WithTimeout(ctx, calicoSyncTimeout)
	defer cancel()
	if !cache.WaitForCacheSync(waitCtx.Done(), l.cnp.informer.HasSynced) {
		klog.FromContext(ctx).Info("ClusterNetworkPolicies not listed yet (is the CRD installed? manifests/sluice-cnp-crds.yaml); they are enforced once they are")
	}
	nodes, _ := l.cnp.nodes.List(labels.Everything())
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, k := range l.cnp.informer.GetStore().ListKeys() {
		l.dirty.policies[ClusterNetworkPolicyKey+k] = true
	}
	for _, n := range nodes {
		l.dirty.netsets[NodeNetworkSetKey+n.Name] = true
	}
}

func convertCNP(obj any, _ TierLookup) (*Policy, error) {
	o, ok := obj.(*cnpv1beta1.ClusterNetworkPolicy)
	if !ok {
		return nil, fmt.Errorf("unexpected object %T", obj)
	}
	return FromClusterNetworkPolicy(o), nil
}

// convertNode returns the network set of a node, nil when it is gone or
// the loop does not read ClusterNetworkPolicies.
func (l *Loop) convertNode(name string) (*NetworkSet, error) {
	if l.cnp == nil || l.cnp.nodes == nil {
		return nil, nil
	}
	n, err := l.cnp.nodes.Get(name)
	if err != nil {
		if strings.Contains(err.Error(), "not found") {
			return nil, nil
		}
		return nil, err
	}
	return nodeNetworkSet(n), nil
}

func nodeNetworkSet(n *corev1.Node) *NetworkSet {
	var addrs []string
	for _, a := range n.Status.Addresses {
		addrs = append(addrs, a.Address) // FromNode keeps those that are IPs
	}
	return FromNode(n.Name, n.Labels, addrs)
}

// queueCNPStatus hands the writer the latest not-programmed reasons,
// replacing what it has not taken yet.
func (l *Loop) queueCNPStatus(notProgrammed map[string]string) {
	if l.cnp == nil {
		return
	}
	select {
	case <-l.cnp.status:
	default:
	}
	l.cnp.status <- notProgrammed
}

// The condition each agent reports on a ClusterNetworkPolicy: the API
// leaves the conditions to the implementation ("it is up to each
// implementation to report what they see fit"). Every node owns one
// condition, through server-side apply with a field manager of its own,
// so agents never overwrite each other.
const (
	cnpConditionPrefix = "Programmed-"
	cnpReasonOK        = "Programmed"
	cnpReasonInvalid   = "NotProgrammed"
)

// cnpCondition is the condition a node reports for a policy.
func cnpCondition(node string, generation int64, why string) *metav1ac.ConditionApplyConfiguration {
	c := metav1ac.Condition().WithType(cnpConditionPrefix + node).WithObservedGeneration(generation).
		WithLastTransitionTime(metav1.Now())
	if why == "" {
		return c.WithStatus(metav1.ConditionTrue).WithReason(cnpReasonOK).WithMessage("programmed on node " + node)
	}
	return c.WithStatus(metav1.ConditionFalse).WithReason(cnpReasonInvalid).
		WithMessage(fmt.Sprintf("on node %s the policy fails closed: %s", node, why))
}

// runCNPStatusWriter applies each policy's condition when its generation
// or reason changed. A failed write is retried with the next sync's
// reasons (or the next one after a second).
func (l *Loop) runCNPStatusWriter(ctx context.Context) {
	var latest map[string]string
	retry := time.NewTicker(time.Second)
	defer retry.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case latest = <-l.cnp.status:
		case <-retry.C:
			if latest == nil {
				continue
			}
		}
		l.writeCNPConditions(ctx, latest)
	}
}

// writeCNPConditions applies this node's condition on every policy whose
// generation or reason changed since the last write, and forgets the
// policies that are gone.
func (l *Loop) writeCNPConditions(ctx context.Context, latest map[string]string) {
	logger := klog.FromContext(ctx)
	present := map[string]bool{}
	for _, obj := range l.cnp.informer.GetStore().List() {
		o, ok := obj.(*cnpv1beta1.ClusterNetworkPolicy)
		if !ok {
			continue
		}
		present[o.Name] = true
		why := latest[ClusterNetworkPolicyKey+o.Name]
		want := fmt.Sprintf("%d/%s", o.Generation, why)
		if l.cnp.written[o.Name] == want && l.cnpConditionPresent(o) {
			continue
		}
		ac := cnpac.ClusterNetworkPolicy(o.Name).WithStatus(cnpac.ClusterNetworkPolicyStatus().
			WithConditions(cnpCondition(l.cfg.NodeName, o.Generation, why)))
		_, err := l.cnp.client.PolicyV1beta1().ClusterNetworkPolicies().ApplyStatus(ctx, ac,
			metav1.ApplyOptions{FieldManager: "sluice-" + l.cfg.NodeName, Force: true})
		if err != nil {
			logger.V(2).Info("writing a ClusterNetworkPolicy status", "policy", o.Name, "err", err)
			continue
		}
		l.cnp.written[o.Name] = want
	}
	// Forget deleted policies, so the map does not grow with every policy
	// ever written.
	for name := range l.cnp.written {
		if !present[name] {
			delete(l.cnp.written, name)
		}
	}
}

// cnpConditionPresent reports whether the informer's copy carries this
// node's condition for the current generation (someone may have cleared
// the status).
func (l *Loop) cnpConditionPresent(o *cnpv1beta1.ClusterNetworkPolicy) bool {
	for _, c := range o.Status.Conditions {
		if c.Type == cnpConditionPrefix+l.cfg.NodeName {
			return c.ObservedGeneration == o.Generation
		}
	}
	return false
}
