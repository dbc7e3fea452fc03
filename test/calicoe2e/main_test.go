// Package calicoe2e proves Calico policies in a Sluice lab against a real
// API server: the projectcalico.org/v3 CRDs Sluice generates, objects
// applied with kubectl, and truth tables of every pod pair (and the
// outside world) compared with the reference evaluator over the same
// objects, read back from the API server.
package calicoe2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	calicoclient "github.com/projectcalico/api/pkg/client/clientset_generated/clientset"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sluice-net/sluice/internal/crdgen"
	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/policy"
	"github.com/sluice-net/sluice/test/labtest"
)

var (
	shared *labtest.Lab
	calico calicoclient.Interface
	// pods are namespace/name; x is team red, y team blue; a is role db
	// with service account sa-a, b role web with sa-b.
	pods = []string{"x/a", "x/b", "y/a", "y/b"}
)

func TestMain(m *testing.M) { labtest.Main(m, lab.Options{Nodes: 2}, &shared, setup) }

// setup starts the pods and installs the v3 CRDs, after the agents: they
// must find the CRDs that appear while they run.
func setup(l *labtest.Lab) (func(), error) {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	rc, err := clientcmd.BuildConfigFromFlags("", l.AdminKubeconfig())
	if err != nil {
		return nil, err
	}
	if calico, err = calicoclient.NewForConfig(rc); err != nil {
		return nil, err
	}
	if err := startPods(ctx, l); err != nil {
		return nil, err
	}
	crds, err := crdgen.Generate(crdgen.V3)
	if err != nil {
		return nil, err
	}
	if err := applyCRDs(ctx, l, string(crds)); err != nil {
		return nil, err
	}
	// The agents create the default tier once they read v3.
	err = wait.PollUntilContextTimeout(ctx, time.Second, time.Minute, true, func(ctx context.Context) (bool, error) {
		_, err := calico.ProjectcalicoV3().Tiers().Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
	if err != nil {
		return nil, fmt.Errorf("the agents never created the default tier: %w", err)
	}
	return nil, nil
}

// applyCRDs applies CRDs and waits until the API server serves them.
func applyCRDs(ctx context.Context, l *labtest.Lab, crds string) error {
	if out, err := l.Kubectl(ctx, crds, "apply", "-f", "-"); err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	if out, err := l.Kubectl(ctx, "", "wait", "--for=condition=Established", "--timeout=60s", "crd", "-l", "app.kubernetes.io/name=sluice"); err != nil {
		return fmt.Errorf("%v: %s", err, out)
	}
	return nil
}

func startPods(ctx context.Context, l *labtest.Lab) error {
	for i, ns := range []string{"x", "y"} {
		team := []string{"red", "blue"}[i]
		if _, err := l.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"ns": ns, "team": team}}}, metav1.CreateOptions{}); err != nil {
			return err
		}
		for _, sa := range []string{"a", "b"} {
			if _, err := l.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "sa-" + sa, Labels: map[string]string{"sa": sa}}}, metav1.CreateOptions{}); err != nil {
				return err
			}
		}
	}
	for i, key := range pods {
		ns, name, _ := strings.Cut(key, "/")
		var ports []corev1.ContainerPort
		for _, p := range []int32{80, 81} {
			for _, proto := range []corev1.Protocol{corev1.ProtocolTCP, corev1.ProtocolUDP} {
				ports = append(ports, corev1.ContainerPort{Name: fmt.Sprintf("serve-%d-%s", p, strings.ToLower(string(proto))), ContainerPort: p, Protocol: proto})
			}
		}
		role := map[string]string{"a": "db", "b": "web"}[name]
		spec := labtest.PodSpec{Namespace: ns, Name: name, Node: l.Nodes[i%2].Name, Labels: map[string]string{"pod": name, "role": role}, Ports: ports}
		pod := spec.Pod()
		pod.Spec.ServiceAccountName = "sa-" + name
		if _, err := l.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
			return err
		}
		if _, err := l.WaitRunning(ctx, ns, name); err != nil {
			return err
		}
	}
	return nil
}

// kubectlApply applies YAML and deletes it when the test ends.
func kubectlApply(t *testing.T, doc string) {
	t.Helper()
	ctx := context.Background()
	// Registered first: what a failed apply created goes too.
	t.Cleanup(func() {
		if out, err := shared.Kubectl(ctx, doc, "delete", "--ignore-not-found", "--wait", "-f", "-"); err != nil {
			t.Errorf("kubectl delete: %v: %s", err, out)
		}
	})
	if out, err := shared.Kubectl(ctx, doc, "apply", "-f", "-"); err != nil {
		t.Fatalf("kubectl apply: %v: %s\n%s", err, out, doc)
	}
}

type probeKey struct {
	from, to string
	port     int32
	proto    policy.Protocol
}

// observe probes every pod pair, and every pod to the outside world, on
// each port and protocol, in parallel.
func observe(ports []int32, protos []policy.Protocol, outside bool) map[probeKey]bool {
	var mu sync.Mutex
	got := map[probeKey]bool{}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	probe := func(from, to string, port int32, proto policy.Protocol) {
		defer wg.Done()
		sem <- struct{}{}
		defer func() { <-sem }()
		place, _ := shared.Resolve(from)
		ip, _ := shared.ResolveTarget(to, false)
		reply, err := lab.Probe(place, ip, int(port), proto == policy.UDP, 700*time.Millisecond)
		mu.Lock()
		got[probeKey{from, to, port, proto}] = err == nil && (reply == to || to == "external" && reply != "")
		mu.Unlock()
	}
	for _, from := range pods {
		for _, proto := range protos {
			for _, to := range pods {
				if to == from {
					continue
				}
				for _, port := range ports {
					wg.Add(1)
					go probe(from, to, port, proto)
				}
			}
			if outside {
				wg.Add(1)
				go probe(from, "external", lab.ExternalPort, proto)
			}
		}
	}
	wg.Wait()
	return got
}

// checkTable compares the observed table with the reference evaluator
// over the objects the API server holds, retrying while the nodes
// converge; then each of the cells in want must hold too, so the table
// is not only self-consistent.
func checkTable(t *testing.T, name string, ports []int32, protos []policy.Protocol, outside bool, want map[probeKey]bool) {
	t.Helper()
	ctx := context.Background()
	var mismatches []string
	_ = wait.PollUntilContextTimeout(ctx, 500*time.Millisecond, 30*time.Second, true, func(context.Context) (bool, error) {
		m := readModel(t, ctx)
		got := observe(ports, protos, outside)
		mismatches = nil
		for k, v := range got {
			if w := m.allowed(k); v != w {
				mismatches = append(mismatches, fmt.Sprintf("%s -> %s %s/%d: observed %v, evaluator %v", k.from, k.to, k.proto, k.port, v, w))
			}
		}
		for k, w := range want {
			if v, ok := got[k]; !ok || v != w {
				mismatches = append(mismatches, fmt.Sprintf("%s -> %s %s/%d: observed %v, the test expects %v", k.from, k.to, k.proto, k.port, v, w))
			}
		}
		return len(mismatches) == 0, nil
	})
	if len(mismatches) > 0 {
		sort.Strings(mismatches)
		t.Errorf("%s: %d mismatches:\n%s", name, len(mismatches), strings.Join(mismatches, "\n"))
	}
}

// clusterModel is the reference's view of the cluster.
type clusterModel struct {
	eval      *policy.Evaluator
	endpoints map[string]policy.Endpoint
}

func (m *clusterModel) allowed(k probeKey) bool {
	dst := m.endpoints[k.to]
	port := k.port
	if k.to == "external" {
		port = lab.ExternalPort
	}
	f := policy.Flow{Src: m.endpoints[k.from], Dst: dst, Proto: k.proto, SrcPort: 40000, DstPort: port}
	return m.eval.Verdict(f).Allowed()
}

// readModel reads pods, namespaces, service accounts, tiers, network sets
// and every kind of policy back from the API server and converts them as
// the agent does.
func readModel(t *testing.T, ctx context.Context) *clusterModel {
	t.Helper()
	m := &clusterModel{eval: &policy.Evaluator{Namespaces: map[string]*policy.Namespace{}}, endpoints: map[string]policy.Endpoint{}}
	tiers := map[string]*policy.Tier{}
	tl, err := calico.ProjectcalicoV3().Tiers().List(ctx, metav1.ListOptions{})
	must(t, err)
	for i := range tl.Items {
		tier, _ := policy.FromTier(&tl.Items[i])
		tiers[tier.Name] = tier
	}
	lookup := func(name string) *policy.Tier { return tiers[name] }
	m.eval.Policies = readPolicies(t, ctx, lookup)
	nsl, err := calico.ProjectcalicoV3().NetworkSets("").List(ctx, metav1.ListOptions{})
	must(t, err)
	for _, o := range nsl.Items {
		s, _ := policy.FromNetworkSet(o.Namespace, o.Name, o.Labels, o.Spec.Nets)
		m.eval.NetworkSets = append(m.eval.NetworkSets, s)
	}
	gsl, err := calico.ProjectcalicoV3().GlobalNetworkSets().List(ctx, metav1.ListOptions{})
	must(t, err)
	for _, o := range gsl.Items {
		s, _ := policy.FromNetworkSet("", o.Name, o.Labels, o.Spec.Nets)
		m.eval.NetworkSets = append(m.eval.NetworkSets, s)
	}
	for _, ns := range []string{"x", "y"} {
		n, err := shared.Client.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		must(t, err)
		m.eval.Namespaces[ns] = &policy.Namespace{Name: ns, Labels: n.Labels}
	}
	for _, key := range pods {
		ns, name, _ := strings.Cut(key, "/")
		p, err := shared.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		must(t, err)
		sa, err := shared.Client.CoreV1().ServiceAccounts(ns).Get(ctx, p.Spec.ServiceAccountName, metav1.GetOptions{})
		must(t, err)
		mp := &policy.Pod{Namespace: ns, Name: name, Labels: p.Labels, NamedPorts: map[string]policy.NamedPort{},
			ServiceAccount: p.Spec.ServiceAccountName, ServiceAccountLabels: sa.Labels}
		for _, ip := range p.Status.PodIPs {
			mp.IPs = append(mp.IPs, netip.MustParseAddr(ip.IP))
		}
		for _, c := range p.Spec.Containers {
			for _, cp := range c.Ports {
				mp.NamedPorts[cp.Name] = policy.NamedPort{Protocol: policy.Protocol(cp.Protocol), Number: cp.ContainerPort}
			}
		}
		m.endpoints[key] = policy.Endpoint{Pod: mp, Namespace: m.eval.Namespaces[ns], IP: mp.IPs[0]}
	}
	m.endpoints["external"] = policy.Endpoint{IP: netip.MustParseAddr(shared.ExternalIP4)}
	return m
}

func readPolicies(t *testing.T, ctx context.Context, tiers policy.TierLookup) []*policy.Policy {
	var out []*policy.Policy
	nps, err := shared.Client.NetworkingV1().NetworkPolicies("").List(ctx, metav1.ListOptions{})
	must(t, err)
	for i := range nps.Items {
		p := policy.FromNetworkPolicy(&nps.Items[i])
		if d := tiers("default"); d != nil {
			p.Tier = d
		}
		out = append(out, p)
	}
	c := calico.ProjectcalicoV3()
	cnp, err := c.NetworkPolicies("").List(ctx, metav1.ListOptions{})
	must(t, err)
	for i := range cnp.Items {
		out = append(out, policy.FromCalicoNetworkPolicy(&cnp.Items[i], tiers))
	}
	gnp, err := c.GlobalNetworkPolicies().List(ctx, metav1.ListOptions{})
	must(t, err)
	for i := range gnp.Items {
		out = append(out, policy.FromCalicoGlobalNetworkPolicy(&gnp.Items[i], tiers))
	}
	snp, err := c.StagedNetworkPolicies("").List(ctx, metav1.ListOptions{})
	must(t, err)
	for i := range snp.Items {
		out = append(out, policy.FromStagedNetworkPolicy(&snp.Items[i], tiers))
	}
	return out
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// agentLog is the node's agent log, for tests that look for a line.
func agentLog(t *testing.T, node string) string {
	b, err := os.ReadFile(shared.AgentLogPath(node))
	if err != nil {
		t.Logf("agent log: %v", err)
	}
	return string(b)
}

var (
	tcp    = []policy.Protocol{policy.TCP}
	tcpUDP = []policy.Protocol{policy.TCP, policy.UDP}
)

func cell(from, to string, port int32, proto policy.Protocol) probeKey {
	return probeKey{from, to, port, proto}
}
