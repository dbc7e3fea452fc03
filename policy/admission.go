package policy

import (
	"context"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/sluice-net/sluice/cni/endpointapi"
)

// A pod's endpoint is programmed only once the loop knows the pod from the
// API server: its labels are what selects it, and a pod modelled without
// them would be missed by every policy with a label selector, so it would
// run unprotected. That happens when the CNI ADD arrives before the pod
// reached the agent's informer (a race of milliseconds, waited out here) or
// while the agent cannot reach the API server (an outage: a sandbox the
// kubelet recreates for a pod it learnt of before, but the agent never
// saw). In the second case ProgramEndpoint gives up when the plugin's
// deadline is near with an error wrapping context.DeadlineExceeded, which
// the registry answers as "retry" and the plugin turns into CNI error 11,
// try again later: the pod does not start until its policy is known.

// podKnownPoll is how often ProgramEndpoint looks again for a pod that is
// not in the cache yet.
const podKnownPoll = 10 * time.Millisecond

// podKnownMargin is kept from the caller's deadline, so the refusal reaches
// the plugin before the plugin stops waiting.
const podKnownMargin = 500 * time.Millisecond

// podLookup answers from the synced pod cache.
type podLookup struct {
	lister corelisters.PodLister
	synced cache.InformerSynced
}

// setPodLookup is called once the informers are started.
func (l *Loop) setPodLookup(lister corelisters.PodLister, synced cache.InformerSynced) {
	l.podLookup.Store(&podLookup{lister: lister, synced: synced})
}

// podKnown says whether the cache holds the endpoint's pod (with the
// endpoint's UID, when the runtime passed one). Endpoints without a pod
// name (a runtime outside Kubernetes) have no labels to wait for.
func (l *Loop) podKnown(ep endpointapi.Endpoint) bool {
	if ep.Namespace == "" || ep.Pod == "" {
		return true
	}
	pl := l.podLookup.Load()
	if pl == nil || !pl.synced() {
		return false
	}
	p, err := pl.lister.Pods(ep.Namespace).Get(ep.Pod)
	if err != nil {
		return false
	}
	return ep.PodUID == "" || p.UID == types.UID(ep.PodUID)
}

// waitPodKnown waits until podKnown, or refuses the endpoint shortly before
// ctx's deadline.
func (l *Loop) waitPodKnown(ctx context.Context, ep endpointapi.Endpoint) error {
	if l.podKnown(ep) {
		return nil
	}
	wait := ctx
	if dl, ok := ctx.Deadline(); ok {
		var cancel context.CancelFunc
		wait, cancel = context.WithDeadline(ctx, dl.Add(-podKnownMargin))
		defer cancel()
	}
	t := time.NewTicker(podKnownPoll)
	defer t.Stop()
	for {
		select {
		case <-wait.Done():
			return fmt.Errorf("pod %s/%s is not known to this agent yet (is the API server reachable?); its labels decide its policy, so it is not wired until they are known: %w",
				ep.Namespace, ep.Pod, context.DeadlineExceeded)
		case <-t.C:
			if l.podKnown(ep) {
				return nil
			}
		}
	}
}

// isResyncReplay says an update is the informer's periodic resync handing
// over the object it already had: the very same object, not a new
// version (a fake clientset in tests may keep resourceVersions).
func isResyncReplay(old, cur any) bool {
	o, ok1 := old.(metav1.Object)
	c, ok2 := cur.(metav1.Object)
	return ok1 && ok2 && o == c
}
