// Package policye2e proves the policy loop in a Sluice lab: the e2e netpol
// model (namespaces x, y, z with pods a, b, c over 3 nodes, serving TCP and
// UDP on 80 and 81 with named ports), truth tables of every pod pair
// compared with the reference semantics, which the policy package's unit
// tests pin to the API reference.
package policye2e

import (
	"context"
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/policy"
	"github.com/sluice-net/sluice/test/labtest"
)

var (
	shared *labtest.Lab
	pods   []string // namespace/name
)

// The lab is dual-stack, so the ipBlock tables check that a block of one
// family leaves the other alone; the other tables probe over IPv4.
func TestMain(m *testing.M) { labtest.Main(m, lab.Options{Nodes: 3, IPv6: true}, &shared, startPods) }

// startPods starts pods a, b and c in namespaces x, y and z, spread over
// the nodes, each serving TCP and UDP on 80 and 81 under named ports.
func startPods(l *labtest.Lab) (func(), error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	i := 0
	for _, ns := range []string{"x", "y", "z"} {
		if _, err := l.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"ns": ns}}}, metav1.CreateOptions{}); err != nil {
			return nil, err
		}
		for _, name := range []string{"a", "b", "c"} {
			var ports []corev1.ContainerPort
			for _, p := range []int32{80, 81} {
				for _, proto := range []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP} {
					ports = append(ports, corev1.ContainerPort{Name: fmt.Sprintf("serve-%d-%s", p, strings.ToLower(string(proto))), ContainerPort: p, Protocol: proto})
				}
			}
			spec := labtest.PodSpec{Namespace: ns, Name: name, Node: l.Nodes[i%3].Name, Labels: map[string]string{"pod": name}, Ports: ports}
			i++
			if _, err := l.CreatePod(ctx, spec); err != nil {
				return nil, err
			}
			pods = append(pods, ns+"/"+name)
		}
	}
	return nil, waitMesh()
}

// waitMesh waits until every pod reaches every pod over TCP, in both
// families, before any test runs: the truth tables' retries are for a
// policy change to converge, not for the overlay to come up (a WireGuard
// tunnel's first handshake can wait for the peer's key). The time it took
// is logged, so a slow overlay shows in the output.
func waitMesh() error {
	start := time.Now()
	var broken []string
	if labtest.Eventually(90*time.Second, func() bool {
		broken = nil
		for _, v6 := range []bool{false, true} {
			for k, ok := range observeFamily(nil, []int32{80}, []policy.Protocol{policy.TCP}, v6) {
				if !ok {
					broken = append(broken, fmt.Sprintf("%s -> %s (ipv6=%v)", k.from, k.to, v6))
				}
			}
		}
		return len(broken) == 0
	}) {
		fmt.Printf("policye2e: every pod reaches every pod %.1f s after the pods ran\n", time.Since(start).Seconds())
		return nil
	}
	sort.Strings(broken)
	return fmt.Errorf("with no policy, %d pod pairs still do not connect after %v: %s", len(broken), time.Since(start).Round(time.Second), strings.Join(broken, ", "))
}

type probeKey struct {
	from, to string
	port     int32
	proto    policy.Protocol
}

// observe probes every pair on every port and protocol, in parallel.
func observe(t *testing.T, ports []int32, protos []policy.Protocol) map[probeKey]bool {
	return observeFamily(t, ports, protos, false)
}

// observeFamily is observe over IPv4 or IPv6.
func observeFamily(t *testing.T, ports []int32, protos []policy.Protocol, ipv6 bool) map[probeKey]bool {
	var mu sync.Mutex
	got := map[probeKey]bool{}
	sem := make(chan struct{}, 24)
	var wg sync.WaitGroup
	for _, from := range pods {
		for _, to := range pods {
			for _, port := range ports {
				for _, proto := range protos {
					wg.Add(1)
					go func() {
						defer wg.Done()
						sem <- struct{}{}
						defer func() { <-sem }()
						place, _ := shared.Resolve(from)
						ip, _ := shared.ResolveTarget(to, ipv6)
						reply, err := lab.Probe(place, ip, int(port), proto == policy.UDP, 700*time.Millisecond)
						mu.Lock()
						got[probeKey{from, to, port, proto}] = err == nil && reply == to
						mu.Unlock()
					}()
				}
			}
		}
	}
	wg.Wait()
	return got
}

// model reads the cluster's pods, namespaces and policies into the
// reference semantics.
func model(t *testing.T, ctx context.Context) ([]*policy.Policy, map[string]policy.Endpoint) {
	return modelFamily(t, ctx, false)
}

// modelFamily is model with each pod's address of one family.
func modelFamily(t *testing.T, ctx context.Context, ipv6 bool) ([]*policy.Policy, map[string]policy.Endpoint) {
	nps, err := shared.Client.NetworkingV1().NetworkPolicies("").List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var pols []*policy.Policy
	for i := range nps.Items {
		pols = append(pols, policy.FromNetworkPolicy(&nps.Items[i]))
	}
	eps := map[string]policy.Endpoint{}
	for _, key := range pods {
		ns, name, _ := strings.Cut(key, "/")
		p, err := shared.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		n, _ := shared.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		mp := &policy.Pod{Namespace: ns, Name: name, Labels: p.Labels, NamedPorts: map[string]policy.NamedPort{}}
		for _, ip := range p.Status.PodIPs {
			mp.IPs = append(mp.IPs, netip.MustParseAddr(ip.IP))
		}
		for _, c := range p.Spec.Containers {
			for _, cp := range c.Ports {
				mp.NamedPorts[cp.Name] = policy.NamedPort{Protocol: policy.Protocol(cp.Protocol), Number: cp.ContainerPort}
			}
		}
		ep := policy.Endpoint{Pod: mp, Namespace: &policy.Namespace{Name: ns, Labels: n.Labels}}
		for _, ip := range mp.IPs {
			if ip.Is6() == ipv6 && !ep.IP.IsValid() {
				ep.IP = ip
			}
		}
		eps[key] = ep
	}
	return pols, eps
}

// checkTable compares the observed table with the reference, retrying for
// a few seconds while the nodes converge.
func checkTable(t *testing.T, name string, ports []int32, protos []policy.Protocol) {
	t.Helper()
	checkTableFamily(t, name, ports, protos, false)
}

// checkTableFamily is checkTable over IPv4 or IPv6.
func checkTableFamily(t *testing.T, name string, ports []int32, protos []policy.Protocol, ipv6 bool) {
	t.Helper()
	ctx := context.Background()
	var mismatches []string
	var pols []*policy.Policy
	var eps map[string]policy.Endpoint
	var got map[probeKey]bool
	_ = wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, 15*time.Second, true, func(context.Context) (bool, error) {
		pols, eps = modelFamily(t, ctx, ipv6)
		got = observeFamily(t, ports, protos, ipv6)
		mismatches = nil
		for k, v := range got {
			want := policy.Allowed(pols, eps[k.from], eps[k.to], k.proto, k.port)
			if v != want {
				mismatches = append(mismatches, fmt.Sprintf("%s -> %s %s/%d: observed %v, expected %v", k.from, k.to, k.proto, k.port, v, want))
			}
		}
		return len(mismatches) == 0, nil
	})
	if len(mismatches) > 0 {
		sort.Strings(mismatches)
		t.Errorf("%s: %d mismatches:\n%s", name, len(mismatches), strings.Join(mismatches, "\n"))
		return
	}
	// Every case of the table, explained by the agents (explain_test.go).
	if wrong := checkExplained(t, name, got, pols, eps); len(wrong) > 0 {
		t.Errorf("%s: explain is wrong on %d cases:\n%s", name, len(wrong), strings.Join(wrong, "\n"))
	}
}

func apply(t *testing.T, nps ...*networkingv1.NetworkPolicy) {
	t.Helper()
	for _, np := range nps {
		if _, err := shared.Client.NetworkingV1().NetworkPolicies(np.Namespace).Create(context.Background(), np, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, np := range nps {
			_ = shared.Client.NetworkingV1().NetworkPolicies(np.Namespace).Delete(context.Background(), np.Name, metav1.DeleteOptions{})
		}
	})
}

func sel(kv ...string) *metav1.LabelSelector {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return &metav1.LabelSelector{MatchLabels: m}
}

var (
	tcpUDP = []policy.Protocol{policy.TCP, policy.UDP}
	both   = []int32{80, 81}
)

func TestNoPolicyAllOpen(t *testing.T) {
	checkTable(t, "no policy", []int32{80}, []policy.Protocol{policy.TCP})
}

func TestDefaultDenyIngressThenAllowFromNamespace(t *testing.T) {
	apply(t,
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "deny"}},
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "from-y-to-a"}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: *sel("pod", "a"),
			Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "y")}}}},
		}})
	checkTable(t, "deny x, allow y -> x/a", []int32{80}, tcpUDP)
}

func TestNamedPortAndEgress(t *testing.T) {
	udp := corev1.ProtocolUDP
	named := networkingv1.NetworkPolicyPort{Protocol: &udp, Port: ptrIntStr("serve-81-udp")}
	apply(t,
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "y", Name: "named"}, Spec: networkingv1.NetworkPolicySpec{
			Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{named}}},
		}},
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "z", Name: "egress-to-x"}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: *sel("pod", "c"),
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress:      []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "x")}}}},
		}})
	checkTable(t, "named port in y, z/c egress to x only", both, tcpUDP)
}

func ptrIntStr(s string) *intstr.IntOrString {
	v := intstr.FromString(s)
	return &v
}

func TestIPBlockExceptEndPortAndTheOutsideHost(t *testing.T) {
	ctx := context.Background()
	// The IP of y/b, to carve out of an ipBlock that holds every pod.
	yb, err := shared.Client.CoreV1().Pods("y").Get(ctx, "b", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tcp := corev1.ProtocolTCP
	apply(t,
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "block"}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: *sel("pod", "a"),
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "10.244.0.0/16", Except: []string{yb.Status.PodIP + "/32"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: ptrIntStr2(79), EndPort: ptrInt32(80)}},
			}},
		}},
		&networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "z", Name: "only-outside"}, Spec: networkingv1.NetworkPolicySpec{
			PodSelector: *sel("pod", "b"),
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress:      []networkingv1.NetworkPolicyEgressRule{{To: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: "198.18.0.0/24"}}}}},
		}})
	checkTable(t, "ipBlock except and endPort on x/a, z/b egress to the outside only", both, []policy.Protocol{policy.TCP})
	// z/b reaches the outside host, and nothing else.
	if got, err := shared.ProbeEventually("z/b", "external", lab.ExternalPort, false, false, 5*time.Second); err != nil {
		t.Errorf("z/b -> external: %q %v", got, err)
	}
	if _, err := shared.Probe("z/a", "external", lab.ExternalPort, false, false); err != nil {
		t.Errorf("z/a (no policy) -> external: %v", err)
	}
}

// TestPolicyChangedWhileTrafficFlows updates a policy in place and checks
// the table before and after.
func TestPolicyChangedWhileTrafficFlows(t *testing.T) {
	ctx := context.Background()
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "changing"}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: *sel("pod", "c"),
		Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{NamespaceSelector: sel("ns", "y")}}}},
	}}
	apply(t, np)
	checkTable(t, "x/c from y", []int32{80}, []policy.Protocol{policy.TCP})
	cur, err := shared.Client.NetworkingV1().NetworkPolicies("x").Get(ctx, "changing", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Spec.Ingress[0].From[0].NamespaceSelector = sel("ns", "z")
	if _, err := shared.Client.NetworkingV1().NetworkPolicies("x").Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	checkTable(t, "x/c from z after the change", []int32{80}, []policy.Protocol{policy.TCP})
}

// TestNodeReachesItsPods: traffic from a pod's own node (kubelet probes)
// passes even when every ingress is denied.
func TestNodeReachesItsPods(t *testing.T) {
	apply(t, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "deny-all"}})
	rec, node, err := shared.FindPod("x/a")
	if err != nil {
		t.Fatal(err)
	}
	_ = rec
	if got, err := shared.ProbeEventually(node.Name, "x/a", 80, false, false, 5*time.Second); err != nil || got != "x/a" {
		t.Errorf("%s -> x/a under default deny: %q %v", node.Name, got, err)
	}
	checkTable(t, "x denied", []int32{80}, []policy.Protocol{policy.TCP})
}

func ptrIntStr2(p int32) *intstr.IntOrString {
	v := intstr.FromInt32(p)
	return &v
}

func ptrInt32(v int32) *int32 { return &v }
