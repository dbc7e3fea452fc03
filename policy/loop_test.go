package policy

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	calicofake "github.com/projectcalico/api/pkg/client/clientset_generated/clientset/fake"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/record"

	"github.com/sluice-net/sluice/cni/endpointapi"
	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

// loopHarness runs a policy loop against a fake clientset, programming a
// test network namespace.
type loopHarness struct {
	t      testing.TB
	ns     ns.NetNS
	client *fake.Clientset
	events *record.FakeRecorder
	loop   *Loop
	done   chan error
}

// apiObjects is namespaces x and y and pods x/a, x/b (local) and y/a.
func apiObjects() []runtime.Object {
	var objs []runtime.Object
	for _, n := range []string{"x", "y"} {
		objs = append(objs, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n, Labels: map[string]string{"ns": n}}})
	}
	for i, key := range []string{"x/a", "x/b", "y/a"} {
		ip := []string{"10.244.1.2", "10.244.1.3", "10.244.2.2"}[i]
		objs = append(objs, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: key[:1], Name: key[2:], UID: types.UID("uid-" + key[2:] + key[:1]), ResourceVersion: "1", Labels: map[string]string{"pod": key[2:]}},
			Spec:       corev1.PodSpec{NodeName: "node-1"},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}},
		})
	}
	return objs
}

func localEndpoint(key, ip string) endpointapi.Endpoint {
	return endpointapi.Endpoint{ContainerID: "c-" + key, Namespace: key[:1], Pod: key[2:], IfName: "eth0", HostVeth: vethOf(key), IPs: []string{ip}}
}

func startLoop(t *testing.T, cfg Config, hook func(*Dataplane), objs ...runtime.Object) *loopHarness {
	eps := []endpointapi.Endpoint{localEndpoint("x/a", "10.244.1.2"), localEndpoint("x/b", "10.244.1.3")}
	return startLoopIn(t, nettest.NewNS(t), cfg, hook, eps, objs...)
}

// startLoopIn runs a loop in a namespace, with local endpoints, and waits
// for its first sync. The loop writes its own hooks: nothing else runs.
func startLoopIn(t testing.TB, netns ns.NetNS, cfg Config, hook func(*Dataplane), eps []endpointapi.Endpoint, objs ...runtime.Object) *loopHarness {
	h := runLoop(t, netns, cfg, func(l *Loop) { l.dataplaneHook = hook }, eps, objs...)
	h.waitFor("the first sync", func(s Status) bool { return s.Ready })
	return h
}

// runLoop runs a loop in a namespace, with local endpoints, after setup
// had its way with it, and returns without waiting for a sync.
func runLoop(t testing.TB, netns ns.NetNS, cfg Config, setup func(*Loop), eps []endpointapi.Endpoint, objs ...runtime.Object) *loopHarness {
	h := &loopHarness{t: t, ns: netns, client: fake.NewClientset(objs...), events: record.NewFakeRecorder(100), done: make(chan error, 1)}
	cfg.NodeName, cfg.IPv4, cfg.IPTablesMode = "node-1", true, iptables.ModeNFT
	h.loop = NewLoop(cfg, h.client, h.events)
	setup(h.loop)
	h.loop.Seed(eps)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		h.done <- h.ns.Do(func(ns.NetNS) error { return h.loop.Run(ctx) })
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-h.done; err != nil {
			t.Errorf("loop: %v", err)
		}
	})
	return h
}

// waitFor waits, up to the 10 s bound every change must meet, for the
// loop's status to satisfy cond.
func (h *loopHarness) waitFor(what string, cond func(Status) bool) {
	h.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		h.loop.mu.Lock()
		ch, st := h.loop.appliedCh, h.loop.status
		h.loop.mu.Unlock()
		if cond(st) {
			return
		}
		select {
		case <-ch:
		case <-time.After(50 * time.Millisecond):
		case err := <-h.done:
			h.t.Fatalf("loop stopped waiting for %s: %v", what, err)
		case <-deadline:
			h.t.Fatalf("timed out waiting for %s; status %+v", what, h.loop.Status())
		}
	}
}

func (h *loopHarness) save() string {
	out, err := exec.Command("ip", "netns", "exec", nettest.Name(h.ns), "iptables-nft-save", "-t", "filter").CombinedOutput()
	if err != nil {
		h.t.Fatal(err)
	}
	return string(out)
}

func (h *loopHarness) create(p *networkingv1.NetworkPolicy) {
	h.t.Helper()
	if _, err := h.client.NetworkingV1().NetworkPolicies(p.Namespace).Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
		h.t.Fatal(err)
	}
}

func (h *loopHarness) event(reason, contains string) {
	h.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case e := <-h.events.Events:
			if strings.Contains(e, reason) && strings.Contains(e, contains) {
				return
			}
		case <-deadline:
			h.t.Fatalf("no %s event containing %q", reason, contains)
		}
	}
}

func netpol(ns, name string, spec networkingv1.NetworkPolicySpec) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: spec}
}

func selects(kv ...string) networkingv1.NetworkPolicySpec {
	return networkingv1.NetworkPolicySpec{PodSelector: *sel(kv...)}
}

// TestLoopIsolatesAPoisonedPolicy: a policy whose set the kernel refuses
// fails closed, is reported (Event naming the field, status), does not
// stop unrelated changes, and converges at once when fixed.
func TestLoopIsolatesAPoisonedPolicy(t *testing.T) {
	_, _, _, _, blockSet := poisonedWorld()
	poison := func(d *Dataplane) {
		fail, tries := true, 0
		poisonSet(d, blockSet, &fail, &tries)
	}
	blocked := netpol("x", "from-block", networkingv1.NetworkPolicySpec{PodSelector: *sel("pod", "a"), Ingress: []networkingv1.NetworkPolicyIngressRule{{
		From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/8"}}}}}})
	h := startLoop(t, Config{}, poison, append(apiObjects(), blocked)...)
	h.waitFor("the poisoned policy reported", func(s Status) bool { return s.NotProgrammed["x/from-block"] != "" })
	if why := h.loop.Status().NotProgrammed["x/from-block"]; !strings.Contains(why, "spec.ingress[0].from[0].ipBlock") || !strings.Contains(why, "poisoned by the test") {
		t.Errorf("reason %q does not name the field and the cause", why)
	}
	h.event("PolicyNotRendered", "spec.ingress[0].from[0].ipBlock")
	if kernel := h.save(); !strings.Contains(kernel, "-A "+PolicyChain("x/from-block", false)+` -m comment --comment "sluice could not program`) {
		t.Errorf("the poisoned policy does not fail closed:\n%s", kernel)
	}
	// An unrelated policy still goes in.
	spec := selects("pod", "b")
	spec.Ingress = []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "y")}}}}
	h.create(netpol("x", "from-y", spec))
	h.waitFor("the unrelated policy", func(s Status) bool { return s.Selected["x/from-y"] == 1 })
	if kernel := h.save(); !strings.Contains(kernel, "-A "+PolicyChain("x/from-y", false)+" -m set --match-set") {
		t.Errorf("the unrelated policy is not in the kernel:\n%s", kernel)
	}
	// Fixed (another block, so another set): programmed at once, and
	// the report clears.
	blocked.Spec.Ingress[0].From[0].IPBlock.CIDR = "10.244.0.0/16"
	blocked.ResourceVersion = "2"
	if _, err := h.client.NetworkingV1().NetworkPolicies("x").Update(context.Background(), blocked, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	h.waitFor("the fixed policy", func(s Status) bool { return s.NotProgrammed["x/from-block"] == "" })
	h.event("PolicyProgrammed", "programmed this policy")
	if kernel := h.save(); !strings.Contains(kernel, "-A "+PolicyChain("x/from-block", false)+" -m set --match-set") {
		t.Errorf("the fixed policy is not in the kernel:\n%s", kernel)
	}
}

// TestLoopReportsAnInvalidPolicy: a policy that cannot be converted gets
// its Event and status entry, and its pods fail closed.
func TestLoopReportsAnInvalidPolicy(t *testing.T) {
	bad := netpol("x", "bad", networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{Key: "pod", Operator: "Near"}}}})
	h := startLoop(t, Config{}, nil, append(apiObjects(), bad)...)
	h.waitFor("the invalid policy reported", func(s Status) bool { return strings.Contains(s.NotProgrammed["x/bad"], "spec.podSelector") })
	h.event("PolicyNotRendered", "spec.podSelector")
}

// TestProgramEndpointWaitsForItsChains: when ProgramEndpoint returns, the
// endpoint's chains are in the kernel.
func TestProgramEndpointWaitsForItsChains(t *testing.T) {
	h := startLoop(t, Config{}, nil, apiObjects()...)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ep := localEndpoint("y/a", "10.244.2.2")
	if err := h.loop.ProgramEndpoint(ctx, ep); err != nil {
		t.Fatal(err)
	}
	if kernel := h.save(); !strings.Contains(kernel, "-g "+EndpointChain(ep.HostVeth, false)) {
		t.Errorf("ProgramEndpoint returned before the endpoint's dispatch rule was written:\n%s", kernel)
	}
}

// TestResyncPeriodRepairsDrift: a rule deleted behind the loop's back comes
// back with the re-read every ResyncPeriod, with no API change to wake it.
func TestResyncPeriodRepairsDrift(t *testing.T) {
	h := startLoop(t, Config{ResyncPeriod: 200 * time.Millisecond}, nil, apiObjects()...)
	chain := EndpointChain(vethOf("x/a"), false)
	if !strings.Contains(h.save(), "-A "+chain) {
		t.Fatal("the endpoint chain is not there to begin with")
	}
	nettest.Run(t, "ip", "netns", "exec", nettest.Name(h.ns), "iptables-nft", "-F", chain)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(h.save(), "-A "+chain) {
		if time.Now().After(deadline) {
			t.Fatal("the flushed chain was not repaired by the periodic re-read")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestDirtyKeysRestored(t *testing.T) {
	var d dirtyKeys
	d.take()
	d.policies["x/p"] = true
	taken := d.take()
	d.pods["x/a"] = true
	d.restore(taken)
	if !d.policies["x/p"] || !d.pods["x/a"] {
		t.Errorf("restore lost keys: %+v", d)
	}
}

// flakyWriter is a rule writer whose Restore fails while failing is set,
// as when the kernel or the iptables lock refuses a transaction; the rest
// goes to the real runner.
type flakyWriter struct {
	contract.HookWriter
	failing  atomic.Bool
	failures atomic.Int32
}

func (w *flakyWriter) Restore(table string, payload []byte) error {
	if w.failing.Load() {
		w.failures.Add(1)
		return errors.New("injected restore failure")
	}
	return w.HookWriter.Restore(table, payload)
}

// TestLoopRetriesAFailedSync: while the rule writer fails, the loop is not
// ready, says why, and ProgramEndpoint does not claim success; once the
// writer works, the loop's own retry (the re-read is an hour away)
// programs everything with no API change to wake it.
func TestLoopRetriesAFailedSync(t *testing.T) {
	w := &flakyWriter{}
	w.failing.Store(true)
	setup := func(l *Loop) {
		l.writerHook = func(r contract.HookWriter) contract.HookWriter { w.HookWriter = r; return w }
	}
	eps := []endpointapi.Endpoint{localEndpoint("x/a", "10.244.1.2")}
	h := runLoop(t, nettest.NewNS(t), Config{ResyncPeriod: time.Hour}, setup, eps, apiObjects()...)
	deadline := time.Now().Add(10 * time.Second)
	for w.failures.Load() < 2 || !strings.Contains(h.loop.Status().LastError, "injected") {
		if time.Now().After(deadline) {
			t.Fatalf("the failing sync was not retried: %d failed restores, status %+v", w.failures.Load(), h.loop.Status())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if s := h.loop.Status(); s.Ready {
		t.Errorf("ready although no sync was applied: %+v", s)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if err := h.loop.ProgramEndpoint(ctx, localEndpoint("x/b", "10.244.1.3")); err == nil || !strings.Contains(err.Error(), "injected") {
		t.Errorf("ProgramEndpoint while every sync fails = %v, want the sync's error", err)
	}

	w.failing.Store(false)
	h.waitFor("the retried sync", func(s Status) bool { return s.Ready && s.LastError == "" && s.Endpoints == 2 })
	kernel := h.save()
	for _, key := range []string{"x/a", "x/b"} {
		if !strings.Contains(kernel, "-g "+EndpointChain(vethOf(key), false)) {
			t.Errorf("%s is not dispatched after the retry:\n%s", key, kernel)
		}
	}
}

func init() {
	// The Calico module's fake clientset predates streaming lists: without
	// this its informers wait 10 s for a bookmark it never sends.
	os.Setenv("KUBE_FEATURE_WatchListClient", "false")
}

// runCalicoLoop runs a loop whose cluster serves projectcalico.org/v3,
// with the module's fake clientset holding calicoObjs.
func runCalicoLoop(t *testing.T, calicoObjs []runtime.Object, objs ...runtime.Object) (*loopHarness, *calicofake.Clientset) {
	cs := calicofake.NewSimpleClientset(calicoObjs...)
	netns := nettest.NewNS(t)
	eps := []endpointapi.Endpoint{localEndpoint("x/a", "10.244.1.2"), localEndpoint("x/b", "10.244.1.3")}
	h := runLoop(t, netns, Config{}, func(l *Loop) {
		l.client.(*fake.Clientset).Resources = []*metav1.APIResourceList{{GroupVersion: "projectcalico.org/v3", APIResources: []metav1.APIResource{{Name: "networkpolicies"}}}}
		l.WithCalico(cs, nil)
	}, eps, objs...)
	h.waitFor("the first sync", func(s Status) bool { return s.Ready })
	return h, cs
}

// TestLoopProgramsCalicoPolicies: a GlobalNetworkPolicy from the Calico
// clientset selects the local endpoints, in its tier ahead of the
// Kubernetes policies; one with an unsupported field fails closed with an
// Event naming the field; the default tier is created.
func TestLoopProgramsCalicoPolicies(t *testing.T) {
	order, deny := float64(100), v3.Deny
	security := &v3.Tier{ObjectMeta: metav1.ObjectMeta{Name: "security", ResourceVersion: "1"}, Spec: v3.TierSpec{Order: &order, DefaultAction: &deny}}
	gnp := &v3.GlobalNetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "deny-b", ResourceVersion: "1"}, Spec: v3.GlobalNetworkPolicySpec{
		Tier: "security", Selector: "pod == 'a'", Ingress: []v3.Rule{{Action: v3.Deny, Source: v3.EntityRule{Selector: "pod == 'b'"}}, {Action: v3.Pass}}}}
	h, cs := runCalicoLoop(t, []runtime.Object{security, gnp}, apiObjects()...)
	key := CalicoGlobalNetworkPolicyKey + "deny-b"
	h.waitFor("the GNP selecting x/a", func(s Status) bool { return slices.Contains(s.EndpointPolicies[vethOf("x/a")], key) })
	kernel := h.save()
	chain := PolicyChain(key, false)
	if !strings.Contains(kernel, "-A "+chain+" -m set --match-set") || !strings.Contains(kernel, "-j DROP") {
		t.Errorf("the Deny rule is not in the kernel:\n%s", kernel)
	}
	if _, err := cs.ProjectcalicoV3().Tiers().Get(context.Background(), "default", metav1.GetOptions{}); err != nil {
		t.Errorf("the default tier was not created: %v", err)
	}
	bad := &v3.GlobalNetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "http"}, Spec: v3.GlobalNetworkPolicySpec{
		Selector: "pod == 'b'", Ingress: []v3.Rule{{Action: v3.Allow, HTTP: &v3.HTTPMatch{Methods: []string{"GET"}}}}}}
	if _, err := cs.ProjectcalicoV3().GlobalNetworkPolicies().Create(context.Background(), bad, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	h.event("PolicyNotRendered", "spec.ingress[0].http")
	h.waitFor("the broken GNP reported", func(s Status) bool {
		return strings.HasPrefix(s.NotProgrammed[CalicoGlobalNetworkPolicyKey+"http"], "spec.ingress[0].http")
	})
}

// TestCalicoListFailureHoldsUpNothingElse: when a Calico kind cannot be
// listed (say, a ClusterRole without it), the Kubernetes policies are
// still programmed, and the loop says it is not ready, and why.
func TestCalicoListFailureHoldsUpNothingElse(t *testing.T) {
	defer func(d time.Duration) { calicoSyncTimeout = d }(calicoSyncTimeout)
	calicoSyncTimeout = 500 * time.Millisecond
	cs := calicofake.NewSimpleClientset()
	cs.PrependReactor("list", "tiers", func(k8stesting.Action) (bool, runtime.Object, error) {
		return true, nil, apierrors.NewForbidden(v3.Resource("tiers"), "", errors.New("no RBAC"))
	})
	eps := []endpointapi.Endpoint{localEndpoint("x/a", "10.244.1.2"), localEndpoint("x/b", "10.244.1.3")}
	objs := append(apiObjects(), netpol("x", "deny", selects("pod", "a")))
	h := runLoop(t, nettest.NewNS(t), Config{}, func(l *Loop) {
		l.client.(*fake.Clientset).Resources = []*metav1.APIResourceList{{GroupVersion: "projectcalico.org/v3", APIResources: []metav1.APIResource{{Name: "networkpolicies"}}}}
		l.WithCalico(cs, nil)
	}, eps, objs...)
	h.waitFor("the Kubernetes policy programmed", func(s Status) bool {
		return s.Ready && slices.Contains(s.EndpointPolicies[vethOf("x/a")], "x/deny")
	})
	if st := h.loop.Status(); st.Sources == "" || h.loop.Ready() {
		t.Errorf("ready=%v with sources %q, want not ready and a reason", h.loop.Ready(), st.Sources)
	}
}

// TestDetectCalicoAPI: v3 when only Sluice's CRDs exist, Canal's v1 when
// only those do, and, while both exist, v1 until v3 holds every policy
// v1 holds.
func TestDetectCalicoAPI(t *testing.T) {
	v1np := func(ns, name string) *unstructured.Unstructured {
		u := &unstructured.Unstructured{}
		u.SetAPIVersion("crd.projectcalico.org/v1")
		u.SetKind("NetworkPolicy")
		u.SetNamespace(ns)
		u.SetName(name)
		return u
	}
	gvrs := map[schema.GroupVersionResource]string{
		{Group: "crd.projectcalico.org", Version: "v1", Resource: "networkpolicies"}:       "NetworkPolicyList",
		{Group: "crd.projectcalico.org", Version: "v1", Resource: "globalnetworkpolicies"}: "GlobalNetworkPolicyList",
	}
	v3np := func(ns, name string) runtime.Object {
		return &v3.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}}
	}
	for _, c := range []struct {
		name   string
		v3, v1 bool
		v3objs []runtime.Object
		want   CalicoAPI
	}{
		{"none", false, false, nil, CalicoNone},
		{"v3 only", true, false, nil, CalicoV3},
		{"v1 only", false, true, nil, CanalV1},
		{"both, v3 empty", true, true, nil, CanalV1},
		{"both, v3 partial", true, true, []runtime.Object{v3np("x", "a")}, CanalV1},
		{"both, v3 covers", true, true, []runtime.Object{v3np("x", "a"), v3np("y", "b")}, CalicoV3},
	} {
		client := fake.NewClientset()
		for api, on := range map[CalicoAPI]bool{CalicoV3: c.v3, CanalV1: c.v1} {
			if on {
				client.Resources = append(client.Resources, &metav1.APIResourceList{GroupVersion: string(api), APIResources: []metav1.APIResource{{Name: "networkpolicies"}}})
			}
		}
		dyn := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), gvrs, v1np("x", "a"), v1np("y", "b"))
		l := NewLoop(Config{}, client, nil).WithCalico(calicofake.NewSimpleClientset(c.v3objs...), dyn)
		if got := l.detectCalico(context.Background()); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}
