// Package e2e proves the lab harness itself: a real control plane, nodes on
// an underlay in network namespaces, and a lab kubelet that runs pods
// through CNI with the reference plugins.
package e2e

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// shared is a 3-node dual-stack lab used by the tests that only add pods.
var shared *labtest.Lab

func TestMain(m *testing.M) {
	labtest.Main(m, lab.Options{Nodes: 3, IPv6: true, CNI: lab.CNIReference}, &shared)
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestControlPlaneComesUp(t *testing.T) {
	ctx := ctxT(t)
	body, err := shared.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
	if err != nil || string(body) != "ok" {
		t.Fatalf("/readyz = %q, %v", body, err)
	}
	// RBAC is on: a node identity may not list secrets cluster-wide.
	out, err := shared.Kubectl(ctx, "", "auth", "can-i", "list", "secrets", "--as=system:node:node-1", "--as-group=system:nodes", "-A")
	if err == nil || !strings.Contains(out, "no") {
		t.Errorf("a node may list all secrets (RBAC/Node authorization off?): %q %v", out, err)
	}
	// The controller-manager's serviceaccount controller made the default
	// ServiceAccount, and ServiceAccount tokens can be issued.
	if _, err := shared.Kubectl(ctx, "", "create", "token", "default", "-n", "default"); err != nil {
		t.Errorf("issuing a ServiceAccount token: %v", err)
	}
}

func TestNodesGetDistinctPodCIDRs(t *testing.T) {
	ctx := ctxT(t)
	nodes, err := shared.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes.Items) != 3 {
		t.Fatalf("want 3 nodes, got %d", len(nodes.Items))
	}
	cluster := netip.MustParsePrefix(lab.DefaultClusterCIDR)
	seen := map[string]string{}
	for _, n := range nodes.Items {
		if len(n.Spec.PodCIDRs) != 2 {
			t.Errorf("node %s: want an IPv4 and an IPv6 pod CIDR, got %v", n.Name, n.Spec.PodCIDRs)
			continue
		}
		p := netip.MustParsePrefix(n.Spec.PodCIDRs[0])
		if !cluster.Contains(p.Addr()) || p.Bits() != 24 {
			t.Errorf("node %s: pod CIDR %s is not a /24 of %s", n.Name, p, cluster)
		}
		for _, c := range n.Spec.PodCIDRs {
			if other, dup := seen[c]; dup {
				t.Errorf("nodes %s and %s share pod CIDR %s", other, n.Name, c)
			}
			seen[c] = n.Name
		}
		if ip := internalIP(&n); !strings.HasPrefix(ip, "198.18.0.") {
			t.Errorf("node %s: InternalIP %q is not on the underlay", n.Name, ip)
		}
	}
}

func internalIP(n *corev1.Node) string {
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			return a.Address
		}
	}
	return ""
}

// TestUnderlayReachability runs a hostNetwork pod on each node and probes
// every node from every other, over IPv4 and IPv6, and the API server from
// every node.
func TestUnderlayReachability(t *testing.T) {
	ctx := ctxT(t)
	const port = 9100
	for _, n := range shared.Nodes {
		if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "underlay", Name: "host-" + n.Name, Node: n.Name, HostNetwork: true,
			Ports: []corev1.ContainerPort{{ContainerPort: port}}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, from := range shared.Nodes {
		for _, to := range shared.Nodes {
			for _, v6 := range []bool{false, true} {
				got, err := shared.Probe(from.Name, to.Name, port, false, v6)
				if want := "underlay/host-" + to.Name; err != nil || got != want {
					t.Errorf("%s -> %s (ipv6=%v): got %q, %v; want %q", from.Name, to.Name, v6, got, err, want)
				}
			}
		}
		if out, err := shared.Exec(from.Name, "nc", "-z", "-w", "2", shared.ControlIP4, "6443"); err != nil {
			t.Errorf("%s cannot connect to the API server at %s:6443: %v %s", from.Name, shared.ControlIP4, err, out)
		}
	}
}

// TestPodLifecycle covers a pod from kubectl to deletion: scheduled or
// pinned, Running with an IP, serving its ports, reaching a neighbour, and
// leaving no IP or namespace behind.
func TestPodLifecycle(t *testing.T) {
	ctx := ctxT(t)
	manifest := `apiVersion: v1
kind: Pod
metadata: {name: web, namespace: life}
spec:
  terminationGracePeriodSeconds: 0
  containers:
  - name: app
    image: lab
    ports: [{containerPort: 80}, {containerPort: 81}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: life}
spec:
  nodeName: node-2
  terminationGracePeriodSeconds: 0
  containers: [{name: app, image: lab}]
`
	if err := shared.EnsureNamespace(ctx, "life"); err != nil {
		t.Fatal(err)
	}
	if _, err := shared.Kubectl(ctx, manifest, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	web, err := shared.WaitRunning(ctx, "life", "web")
	if err != nil {
		t.Fatal(err)
	}
	if web.Spec.NodeName == "" {
		t.Fatal("the scheduler did not bind web")
	}
	// Put the client next to web, so the reference ptp chain can reach it.
	if web.Spec.NodeName != "node-2" {
		if err := shared.DeletePod(ctx, "life", "client"); err != nil {
			t.Fatal(err)
		}
		if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "life", Name: "client", Node: web.Spec.NodeName}); err != nil {
			t.Fatal(err)
		}
	} else if _, err := shared.WaitRunning(ctx, "life", "client"); err != nil {
		t.Fatal(err)
	}
	// A new IPv6 address is usable once duplicate address detection is
	// done; wait for the first answer before asserting on every port.
	if _, err := shared.ProbeEventually("life/client", "life/web", 80, false, true, 10*time.Second); err != nil {
		t.Fatalf("client never reached web over IPv6: %v", err)
	}
	if len(web.Status.PodIPs) != 2 {
		t.Errorf("dual-stack pod got IPs %v, want one per family", web.Status.PodIPs)
	}
	for _, port := range []int{80, 81} {
		for _, udp := range []bool{false, true} {
			for _, v6 := range []bool{false, true} {
				got, err := shared.Probe("life/client", "life/web", port, udp, v6)
				if err != nil || got != "life/web" {
					t.Errorf("client -> web:%d udp=%v ipv6=%v: got %q, %v", port, udp, v6, got, err)
				}
			}
		}
	}
	// The same answer through the sluicectl command a user runs.
	bins, _ := labtest.Binaries()
	out, err := labtest.Command(bins+"/sluicectl", "lab", "--lab-dir", shared.Dir, "probe", "life/client", "life/web", "80")
	if err != nil || strings.TrimSpace(out) != "life/web" {
		t.Errorf("sluicectl lab probe: %q, %v", out, err)
	}
	if _, err := labtest.Command(bins+"/sluicectl", "lab", "--lab-dir", shared.Dir, "probe", "life/client", "life/web", "82", "--timeout", "500ms"); err == nil {
		t.Error("sluicectl lab probe of a closed port exited 0")
	}

	node, _ := shared.Node(web.Spec.NodeName)
	rec, _, err := shared.FindPod("life/web")
	if err != nil {
		t.Fatal(err)
	}
	ipFile := "/var/lib/cni/networks/lab-ptp/" + web.Status.PodIP
	if _, err := shared.Exec(node.Name, "test", "-e", ipFile); err != nil {
		t.Fatalf("host-local has no reservation for %s: %v", web.Status.PodIP, err)
	}
	if _, err := shared.Kubectl(ctx, "", "delete", "pod", "-n", "life", "web", "--wait=true"); err != nil {
		t.Fatal(err)
	}
	// A zero grace period removes the pod from the API at once; the
	// kubelet tears the sandbox down right after.
	gone := func(path string) func() bool {
		return func() bool { _, err := shared.Exec(node.Name, "test", "-e", path); return err != nil }
	}
	if !labtest.Eventually(10*time.Second, gone(ipFile)) {
		t.Errorf("IP %s still reserved after the pod was deleted", web.Status.PodIP)
	}
	if !labtest.Eventually(10*time.Second, gone(rec.NetNS)) {
		t.Errorf("pod namespace %s still exists after the pod was deleted", rec.NetNS)
	}
	if !labtest.Eventually(10*time.Second, func() bool { _, _, err := shared.FindPod("life/web"); return err != nil }) {
		t.Error("the lab still lists the deleted pod")
	}
}

func TestHostPort(t *testing.T) {
	ctx := ctxT(t)
	if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "hostport", Name: "web", Node: "node-3",
		Ports: []corev1.ContainerPort{{ContainerPort: 80, HostPort: 8080, Protocol: corev1.ProtocolTCP}}}); err != nil {
		t.Fatal(err)
	}
	for _, from := range []string{"node-1", "external"} {
		got, err := shared.Probe(from, "node-3", 8080, false, false)
		if err != nil || got != "hostport/web" {
			t.Errorf("%s -> node-3:8080: got %q, %v; want hostport/web", from, got, err)
		}
	}
}

func TestBandwidthAnnotations(t *testing.T) {
	ctx := ctxT(t)
	if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "bw", Name: "slow", Node: "node-1",
		Annotations: map[string]string{"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "20M"}}); err != nil {
		t.Fatal(err)
	}
	out, err := shared.Exec("node-1", "tc", "qdisc", "show")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "tbf") {
		t.Errorf("no token bucket filter on node-1 after a bandwidth-annotated pod:\n%s", out)
	}
}

// TestNoPodCIDRAndDown covers --no-pod-cidr, and that Down leaves nothing
// behind even after the lab's processes were killed.
func TestNoPodCIDRAndDown(t *testing.T) {
	ctx := ctxT(t)
	l, err := labtest.Start(lab.Options{Nodes: 2, NoPodCIDR: true, CNI: lab.CNIReference})
	if err != nil {
		t.Fatal(err)
	}
	stopped := false
	defer func() {
		if !stopped {
			_ = l.Stop()
		}
	}()
	nodes, err := l.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes.Items {
		if len(n.Spec.PodCIDRs) != 0 {
			t.Errorf("node %s got pod CIDRs %v with --no-pod-cidr", n.Name, n.Spec.PodCIDRs)
		}
	}
	// A hostNetwork pod runs without any CNI config, so the lab has live
	// processes and namespaces to clean up.
	if _, err := l.CreatePod(ctx, labtest.PodSpec{Name: "host", Node: "node-1", HostNetwork: true, Ports: []corev1.ContainerPort{{ContainerPort: 9200}}}); err != nil {
		t.Fatal(err)
	}
	labtest.AssertDownLeavesNothing(t, l, true)
	stopped = true
}

// TestDeploymentIsScheduled shows the deployment and replicaset controllers
// and the scheduler at work: a Deployment's pods land on lab nodes and run.
func TestDeploymentIsScheduled(t *testing.T) {
	ctx := ctxT(t)
	manifest := `apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: deploy}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 0
      containers: [{name: app, image: lab, ports: [{containerPort: 80}]}]
`
	if err := shared.EnsureNamespace(ctx, "deploy"); err != nil {
		t.Fatal(err)
	}
	if _, err := shared.Kubectl(ctx, manifest, "apply", "-f", "-"); err != nil {
		t.Fatal(err)
	}
	if out, err := shared.Kubectl(ctx, "", "rollout", "status", "-n", "deploy", "deployment/web", "--timeout=2m"); err != nil {
		t.Fatalf("rollout: %v %s", err, out)
	}
	pods, err := shared.Client.CoreV1().Pods("deploy").List(ctx, metav1.ListOptions{LabelSelector: "app=web"})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range pods.Items {
		if p.Spec.NodeName == "" || p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
			t.Errorf("pod %s: node %q phase %s ip %q", p.Name, p.Spec.NodeName, p.Status.Phase, p.Status.PodIP)
		}
	}
}
