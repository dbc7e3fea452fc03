// Package cnie2e proves the sluice CNI plugin in a lab whose kubelets call
// the installed 10-sluice.conflist through libcni, as containerd does.
package cnie2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/sluice-net/sluice/cni"
	"github.com/sluice-net/sluice/internal/endpoints"
	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/internal/status"
	"github.com/sluice-net/sluice/test/labtest"
)

var shared *labtest.Lab

func TestMain(m *testing.M) { labtest.Main(m, lab.Options{Nodes: 3, IPv6: true}, &shared) }

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func TestInstalledConflistIsUsed(t *testing.T) {
	for _, n := range shared.Nodes {
		out, err := shared.Exec(n.Name, "ls", "/etc/cni/net.d", "/opt/cni/bin")
		if err != nil {
			t.Fatal(err)
		}
		for _, want := range []string{"10-sluice.conflist", "sluice", "host-local", "portmap", "bandwidth", "loopback"} {
			if !strings.Contains(out, want) {
				t.Errorf("%s lacks %s:\n%s", n.Name, want, out)
			}
		}
	}
}

func TestPodsAcrossNodes(t *testing.T) {
	ctx := ctxT(t)
	var names []string
	for i, n := range shared.Nodes {
		name := fmt.Sprintf("p%d", i+1)
		names = append(names, "across/"+name)
		if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "across", Name: name, Node: n.Name, Ports: []corev1.ContainerPort{{ContainerPort: 80}}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, v6 := range []bool{false, true} {
		for _, from := range names {
			for _, to := range names {
				for _, udp := range []bool{false, true} {
					got, err := shared.ProbeEventually(from, to, 80, udp, v6, 5*time.Second)
					if err != nil || got != to {
						t.Errorf("%s -> %s udp=%v ipv6=%v: %q %v", from, to, udp, v6, got, err)
					}
				}
			}
		}
	}
	// The agent annotated each pod with its IPs as soon as it was wired.
	for _, p := range names {
		pod, err := shared.Client.CoreV1().Pods("across").Get(ctx, strings.TrimPrefix(p, "across/"), metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := pod.Annotations[endpoints.PodIPsAnnotation]; got != pod.Status.PodIPs[0].IP+","+pod.Status.PodIPs[1].IP {
			t.Errorf("%s: %s=%q, status IPs %v", p, endpoints.PodIPsAnnotation, got, pod.Status.PodIPs)
		}
	}
}

// TestFiftyConcurrentAdds starts 50 pods on one node at once: the kubelet
// runs 8 sandbox set-ups in parallel, as a busy node would.
func TestFiftyConcurrentAdds(t *testing.T) {
	ctx := ctxT(t)
	if err := shared.EnsureNamespace(ctx, "burst"); err != nil {
		t.Fatal(err)
	}
	if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "burst", Name: "client", Node: "node-2"}); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := labtest.PodSpec{Namespace: "burst", Name: fmt.Sprintf("b%02d", i), Node: "node-1", Ports: []corev1.ContainerPort{{ContainerPort: 80}}}
			if _, err := shared.Client.CoreV1().Pods("burst").Create(ctx, p.Pod(), metav1.CreateOptions{}); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	ips := map[string]string{}
	for i := 0; i < 50; i++ {
		name := fmt.Sprintf("b%02d", i)
		pod, err := shared.WaitRunning(ctx, "burst", name)
		if err != nil {
			t.Fatal(err)
		}
		for _, ip := range pod.Status.PodIPs {
			if other, dup := ips[ip.IP]; dup {
				t.Errorf("%s and %s share %s", other, name, ip.IP)
			}
			ips[ip.IP] = name
		}
		got, err := shared.ProbeEventually("burst/client", "burst/"+name, 80, false, false, 5*time.Second)
		if err != nil || got != "burst/"+name {
			t.Errorf("client -> %s: %q %v", name, got, err)
		}
	}
	if len(ips) != 100 {
		t.Errorf("%d distinct IPs for 50 dual-stack pods, want 100", len(ips))
	}
}

func TestHostPortThroughTheChain(t *testing.T) {
	ctx := ctxT(t)
	if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "hp", Name: "web", Node: "node-3",
		Ports: []corev1.ContainerPort{{ContainerPort: 80, HostPort: 8088, Protocol: corev1.ProtocolTCP}}}); err != nil {
		t.Fatal(err)
	}
	for _, from := range []string{"node-1", "external"} {
		got, err := shared.ProbeEventually(from, "node-3", 8088, false, false, 5*time.Second)
		if err != nil || got != "hp/web" {
			t.Errorf("%s -> node-3:8088: %q %v", from, got, err)
		}
	}
}

// TestAgentDownThenBack: with sluiced down, the sandbox set-up fails (CNI
// error 11, "try again later") and the pod waits; once the agent is back,
// the kubelet's retry succeeds.
func TestAgentDownThenBack(t *testing.T) {
	ctx := ctxT(t)
	node, _ := shared.Node("node-2")
	if err := os.WriteFile(node.AgentDisabledPath(), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(node.AgentDisabledPath())
	if err := shared.KillAgent("node-2"); err != nil {
		t.Fatal(err)
	}
	if err := shared.EnsureNamespace(ctx, "down"); err != nil {
		t.Fatal(err)
	}
	p := labtest.PodSpec{Namespace: "down", Name: "waits", Node: "node-2", Ports: []corev1.ContainerPort{{ContainerPort: 80}}}
	if _, err := shared.Client.CoreV1().Pods("down").Create(ctx, p.Pod(), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var msg string
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		evs, err := shared.Client.CoreV1().Events("down").List(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("involvedObject.name", "waits").String()})
		if err != nil {
			return false, nil
		}
		for _, e := range evs.Items {
			if e.Reason == "FailedCreatePodSandBox" {
				msg = e.Message
				return true, nil
			}
		}
		return false, nil
	}); err != nil {
		t.Fatalf("no FailedCreatePodSandBox event while the agent was down: %v", err)
	}
	if !strings.Contains(msg, "sluiced") || !strings.Contains(msg, "retry") {
		t.Errorf("the failure does not say the agent is down and to retry: %s", msg)
	}
	pod, _ := shared.Client.CoreV1().Pods("down").Get(ctx, "waits", metav1.GetOptions{})
	if pod.Status.Phase == corev1.PodRunning {
		t.Fatal("pod ran while the agent was down")
	}
	// A refused ADD leaves nothing half-made on the node (the client pod
	// of another test may run there, so count the pod's own veth name).
	// The kubelet keeps retrying, and a retry caught in the middle has its
	// veth until the refusal rolls it back: a leaked veth is one that never
	// goes away.
	var links string
	leaked := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 10*time.Second, true, func(context.Context) (bool, error) {
		links, _ = shared.Exec("node-2", "ip", "-o", "link")
		return !strings.Contains(links, cniVethOf("down", "waits")), nil
	}) != nil
	if leaked {
		t.Errorf("a refused ADD left its veth:\n%s", links)
	}
	os.Remove(node.AgentDisabledPath())
	if _, err := shared.WaitRunning(ctx, "down", "waits"); err != nil {
		t.Fatalf("pod did not start once the agent was back: %v", err)
	}
	if got, err := shared.ProbeEventually("node-1", "down/waits", 80, false, false, 10*time.Second); err != nil || got != "down/waits" {
		t.Errorf("node-1 -> down/waits: %q %v", got, err)
	}
}

// podVeth matches the host side of a pod veth in `ip -o link` output.
var podVeth = regexp.MustCompile(`(?m)^\d+: sl[0-9a-f]{11}[@:]`)

func cniVethOf(namespace, name string) string { return cni.HostVethName(namespace, name, "") }

func countSluiceVeths(t *testing.T, node string) int {
	out, err := shared.Exec(node, "ip", "-o", "link", "show")
	if err != nil {
		t.Fatal(err)
	}
	return len(podVeth.FindAllString(out, -1))
}

// TestNothingLeftAfterDeletion deletes every pod but Sluice's and checks each node: no
// reserved IP, no Sluice veth, no pod route, no IPAM or endpoint record.
// It runs last (the tests above leave pods behind on purpose).
func TestZNothingLeftAfterDeletion(t *testing.T) {
	ctx := ctxT(t)
	nsList, err := shared.Client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Sluice's own pods (hostNetwork, in kube-system) stay: the agents
	// must serve the CNI DELs.
	notAgents := metav1.ListOptions{FieldSelector: "metadata.namespace!=" + lab.AgentNamespace}
	for _, ns := range nsList.Items {
		if ns.Name != lab.AgentNamespace {
			_ = shared.Client.CoreV1().Pods(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{})
		}
	}
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		pods, err := shared.Client.CoreV1().Pods("").List(ctx, notAgents)
		return err == nil && len(pods.Items) == 0, nil
	}); err != nil {
		t.Fatal(err)
	}
	for _, n := range shared.Nodes {
		check := func() error {
			if c := countSluiceVeths(t, n.Name); c != 0 {
				return fmt.Errorf("%d sluice veths left", c)
			}
			if out, _ := shared.Exec(n.Name, "sh", "-c", "ls /var/lib/cni/networks/sluice/ | grep -v -e lock -e last_reserved || true"); strings.TrimSpace(out) != "" {
				return fmt.Errorf("IPs still reserved: %s", out)
			}
			if out, _ := shared.Exec(n.Name, "sh", "-c", "ls /var/lib/cni/sluice /var/lib/sluice/endpoints 2>/dev/null || true"); strings.TrimSpace(out) != "" && !onlyDirHeaders(out) {
				return fmt.Errorf("records left: %s", out)
			}
			for _, fam := range []string{"-4", "-6"} {
				out, _ := shared.Exec(n.Name, "ip", fam, "route", "show", "scope", "link")
				for _, l := range strings.Split(out, "\n") {
					if strings.Contains(l, " dev sl") {
						return fmt.Errorf("pod route left: %s", l)
					}
				}
			}
			return nil
		}
		if err := eventually(check); err != nil {
			t.Errorf("%s: %v", n.Name, err)
		}
	}
}

func onlyDirHeaders(out string) bool {
	for _, l := range strings.Split(out, "\n") {
		l = strings.TrimSpace(l)
		if l != "" && !strings.HasSuffix(l, ":") {
			return false
		}
	}
	return true
}

func eventually(check func() error) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := check()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestForwardDropPolicy: on nodes whose FORWARD policy is DROP (a Docker
// host), pods still reach each other and the outside world, because Sluice
// accepts pod traffic in its own chain, per pod veth, after the policy
// chains, and adds no blanket accept for the cluster network.
func TestForwardDropPolicy(t *testing.T) {
	ctx := ctxT(t)
	for _, n := range shared.Nodes {
		for _, bin := range []string{"iptables", "ip6tables"} {
			if _, err := shared.Exec(n.Name, bin, "-P", "FORWARD", "DROP"); err != nil {
				t.Fatal(err)
			}
			defer shared.Exec(n.Name, bin, "-P", "FORWARD", "ACCEPT")
		}
		out, err := shared.Exec(n.Name, "iptables", "-S", "FORWARD")
		if err != nil {
			t.Fatal(err)
		}
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if len(lines) < 2 || !strings.HasSuffix(lines[1], "-j SLUICE-FORWARD") {
			t.Errorf("%s: SLUICE-FORWARD is not first in FORWARD:\n%s", n.Name, out)
		}
		if strings.Contains(out, "10.244.0.0/16") {
			t.Errorf("%s: a FORWARD rule names the cluster network:\n%s", n.Name, out)
		}
	}
	for i, n := range shared.Nodes[:2] {
		if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "fwd", Name: fmt.Sprintf("f%d", i), Node: n.Name, Ports: []corev1.ContainerPort{{ContainerPort: 80}}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, v6 := range []bool{false, true} {
		if got, err := shared.ProbeEventually("fwd/f0", "fwd/f1", 80, false, v6, 5*time.Second); err != nil || got != "fwd/f1" {
			t.Errorf("f0 -> f1 ipv6=%v with FORWARD DROP: %q %v", v6, got, err)
		}
		if got, err := shared.ProbeEventually("fwd/f1", "external", lab.ExternalPort, false, v6, 5*time.Second); err != nil || !strings.HasPrefix(got, "external from=") {
			t.Errorf("f1 -> external ipv6=%v with FORWARD DROP: %q %v", v6, got, err)
		}
	}
}

func TestBandwidthThroughTheChain(t *testing.T) {
	ctx := ctxT(t)
	if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "bw", Name: "slow", Node: "node-3",
		Annotations: map[string]string{"kubernetes.io/ingress-bandwidth": "10M", "kubernetes.io/egress-bandwidth": "10M"}}); err != nil {
		t.Fatal(err)
	}
	veth := cni.HostVethName("bw", "slow", "")
	out, err := shared.Exec("node-3", "tc", "qdisc", "show", "dev", veth)
	if err != nil || !strings.Contains(out, "tbf") {
		t.Errorf("no token bucket on %s: %v\n%s", veth, err, out)
	}
}

// TestSluicectlStatus reads node-1's agent report through the command an
// operator runs.
func TestSluicectlStatus(t *testing.T) {
	ctx := ctxT(t)
	if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "status", Name: "on-1", Node: "node-1"}); err != nil {
		t.Fatal(err)
	}
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	out, err := labtest.Command(bins+"/sluicectl", "status", "--lab-dir", shared.Dir, "--node", "node-1", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var r status.Report
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if r.Node != "node-1" || !r.Overlay.Ready || !r.Policy.Ready || len(r.Overlay.Lease) != 2 || r.Overlay.MTU != 1430 || r.Overlay.Backend != "vxlan" {
		t.Errorf("report: %+v", r)
	}
	if len(r.Overlay.Peers) != 4 { // two nodes, two families
		t.Errorf("peers: %+v", r.Overlay.Peers)
	}
	found := false
	for _, e := range r.Endpoints {
		if e.Pod == "status/on-1" && strings.HasPrefix(e.HostVeth, "sl") {
			found = true
		}
	}
	if !found {
		t.Errorf("endpoint status/on-1 missing: %+v", r.Endpoints)
	}
	table, err := labtest.Command(bins+"/sluicectl", "status", "--lab-dir", shared.Dir, "--node", "node-1")
	if err != nil || !strings.Contains(table, "overlay: ready") || !strings.Contains(table, "status/on-1") {
		t.Errorf("table output: %v\n%s", err, table)
	}
}

// TestCNIMetrics: the agent's /metrics counts the plugin's calls by verb,
// result and error code, as reported over the agent's socket.
func TestCNIMetrics(t *testing.T) {
	ctx := ctxT(t)
	const node = "node-2"
	if _, err := shared.CreatePod(ctx, labtest.PodSpec{Namespace: "metrics", Name: "counted", Node: node}); err != nil {
		t.Fatal(err)
	}
	if err := shared.DeletePod(ctx, "metrics", "counted"); err != nil {
		t.Fatal(err)
	}
	// A CHECK without prevResult is refused with CNI error 7.
	out, _ := shared.Exec(node, "sh", "-c", `echo '{"cniVersion":"1.0.0","name":"sluice","type":"sluice"}' | `+
		`CNI_COMMAND=CHECK CNI_CONTAINERID=metrics-probe CNI_NETNS=/proc/self/ns/net CNI_IFNAME=eth0 CNI_PATH=/opt/cni/bin /opt/cni/bin/sluice`)
	if !strings.Contains(out, `"code": 7`) {
		t.Fatalf("CHECK without prevResult answered %q; want CNI error 7", out)
	}
	want := []*regexp.Regexp{
		regexp.MustCompile(`(?m)^sluice_cni_requests_total\{result="ok",verb="ADD"\} [1-9]`),
		regexp.MustCompile(`(?m)^sluice_cni_requests_total\{result="ok",verb="DEL"\} [1-9]`),
		regexp.MustCompile(`(?m)^sluice_cni_requests_total\{result="error",verb="CHECK"\} [1-9]`),
		regexp.MustCompile(`(?m)^sluice_cni_errors_total\{code="7",verb="CHECK"\} [1-9]`),
	}
	err := eventually(func() error {
		metrics, err := shared.Exec(node, "curl", "-sf", "http://127.0.0.1:9098/metrics")
		if err != nil {
			return err
		}
		for _, re := range want {
			if !re.MatchString(metrics) {
				return fmt.Errorf("/metrics lacks %s; it has:\n%s", re, grepLines(metrics, "sluice_cni_"))
			}
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

func grepLines(s, substr string) string {
	var keep []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, substr) {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

// TestAgentHealthAndMetrics: the agent answers its probes and /metrics
// carries every family an operator dashboards on, from the start.
func TestAgentHealthAndMetrics(t *testing.T) {
	const node = "node-1"
	for _, path := range []string{"/healthz", "/readyz"} {
		if out, err := shared.Exec(node, "curl", "-sf", "http://127.0.0.1:9098"+path); err != nil {
			t.Errorf("%s: %v %s", path, err, out)
		}
	}
	metrics, err := shared.Exec(node, "curl", "-sf", "http://127.0.0.1:9098/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`sluice_apply_duration_seconds_bucket{loop="overlay",le="0.01"}`,
		`sluice_apply_duration_seconds_bucket{loop="policy",le="0.01"}`,
		`sluice_apply_errors_total{loop="policy"}`,
		`sluice_drift_repairs_total{kind="route"}`,
		`sluice_drift_repairs_total{kind="policy-chain"}`,
		`sluice_endpoints_programmed `,
		`sluice_policies_programmed `,
		`sluice_cni_requests_total{result="error",verb="ADD"}`,
		`sluice_iptables_restore_failures_total `,
		`process_resident_memory_bytes `,
	} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}
