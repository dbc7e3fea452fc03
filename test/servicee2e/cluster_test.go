package servicee2e

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// The workload every lab gets, in namespace svc:
//
//	web-1  app=web    node-1   netexec on 8080, behind Services web (ClusterIP
//	                           80), web-cluster (NodePort 30080,
//	                           externalTrafficPolicy Cluster) and web-local
//	                           (NodePort 30081, Local)
//	db-1   app=db     node-1   netexec on 8080, behind Service db (ClusterIP 80)
//	client role=client node-2
//	other  role=other node-2
//
// and Service empty, which has no endpoints.
const (
	ns            = "svc"
	nodePortCl    = 30080
	nodePortLocal = 30081
)

type cluster struct {
	*labtest.Lab
	// clusterIPs by Service name.
	clusterIPs map[string]string
	// podIPs by pod name.
	podIPs map[string]string
	// lostConnects counts the benchmarks' connects that timed out.
	lostConnects int
}

// startCluster brings up a 2-node lab of real nodes with kube-proxy in the
// given mode and Sluice installed, and the workload above.
func startCluster(t testing.TB, mode, backend string) *cluster {
	t.Helper()
	l := labtest.StartT(t, lab.Options{Nodes: 2, Runtime: lab.RuntimeContainerd, ProxyMode: mode, ProxyBackend: backend, Timeout: 5 * time.Minute})
	c := &cluster{Lab: l, clusterIPs: map[string]string{}, podIPs: map[string]string{}}
	ctx := ctxT(t, 3*time.Minute)
	if err := l.EnsureNamespace(ctx, ns); err != nil {
		t.Fatal(err)
	}
	for _, p := range []struct{ name, key, value, node string }{
		{"web-1", "app", "web", "node-1"}, {"db-1", "app", "db", "node-1"},
		{"client", "role", "client", "node-2"}, {"other", "role", "other", "node-2"},
	} {
		pod, err := c.createPod(ctx, ns, p.name, map[string]string{p.key: p.value}, p.node)
		if err != nil {
			t.Fatal(err)
		}
		c.podIPs[p.name] = pod.Status.PodIP
	}
	for _, s := range []*corev1.Service{
		service("web", "web", corev1.ServiceTypeClusterIP, 0, ""),
		service("db", "db", corev1.ServiceTypeClusterIP, 0, ""),
		service("web-cluster", "web", corev1.ServiceTypeNodePort, nodePortCl, corev1.ServiceExternalTrafficPolicyCluster),
		service("web-local", "web", corev1.ServiceTypeNodePort, nodePortLocal, corev1.ServiceExternalTrafficPolicyLocal),
		service("empty", "nothing", corev1.ServiceTypeClusterIP, 0, ""),
	} {
		created, err := l.Client.CoreV1().Services(ns).Create(ctx, s, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		c.clusterIPs[s.Name] = created.Spec.ClusterIP
	}
	// kube-proxy has programmed the Services once they answer.
	for _, target := range []string{c.svc("web"), c.svc("db"), c.nodePort("node-1", nodePortCl)} {
		if _, err := c.getEventually("svc/client", target, true, time.Minute); err != nil {
			t.Fatalf("%s never answered: %v", target, err)
		}
	}
	return c
}

func (c *cluster) createPod(ctx context.Context, namespace, name string, labels map[string]string, node string) (*corev1.Pod, error) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			TerminationGracePeriodSeconds: new(int64),
			Containers: []corev1.Container{{
				Name: "agnhost", Image: labtest.AgnhostImage, ImagePullPolicy: corev1.PullNever,
				Args:  []string{"netexec", "--http-port=8080"},
				Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}},
			}},
		},
	}
	if _, err := c.Client.CoreV1().Pods(namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("creating pod %s/%s: %w", namespace, name, err)
	}
	return c.WaitRunning(ctx, namespace, name)
}

func service(name, app string, typ corev1.ServiceType, nodePort int32, etp corev1.ServiceExternalTrafficPolicy) *corev1.Service {
	s := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			Type:     typ,
			Selector: map[string]string{"app": app},
			Ports:    []corev1.ServicePort{{Port: 80, TargetPort: intstr.FromInt32(8080), NodePort: nodePort}},
		},
	}
	if etp != "" {
		s.Spec.ExternalTrafficPolicy = etp
	}
	return s
}

// svc is a Service's ClusterIP:80.
func (c *cluster) svc(name string) string { return net.JoinHostPort(c.clusterIPs[name], "80") }

// nodePort is a node's address with a NodePort.
func (c *cluster) nodePort(node string, port int) string {
	n, _ := c.Node(node)
	return net.JoinHostPort(n.IP4, fmt.Sprint(port))
}

// nodeTunnelIP is the address a node masquerades to when it forwards into
// the overlay: the first address of its pod CIDR, on its VXLAN device.
func (c *cluster) nodeTunnelIP(t *testing.T, node string) string {
	n, err := c.Client.CoreV1().Nodes().Get(ctxT(t, 10*time.Second), node, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ip, _, err := net.ParseCIDR(n.Spec.PodCIDR)
	if err != nil {
		t.Fatal(err)
	}
	return ip.String()
}

// clientIP asks netexec at target for the source address it saw, from a
// place (svc/POD, NODE or external).
func (c *cluster) clientIP(from, target string) (string, error) {
	place, err := c.Resolve(from)
	if err != nil {
		return "", err
	}
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
			return place.Dial(network, addr, 2*time.Second)
		},
	}}
	resp, err := hc.Get("http://" + target + "/clientip")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	host, _, err := net.SplitHostPort(strings.TrimSpace(string(b)))
	if err != nil {
		return "", fmt.Errorf("netexec said %q: %w", b, err)
	}
	return host, nil
}

// getEventually polls until the connection's outcome is want (answered
// or not) and returns the source address seen when it answered.
func (c *cluster) getEventually(from, target string, want bool, timeout time.Duration) (string, error) {
	var seen string
	var last error
	ok := labtest.Eventually(timeout, func() bool {
		seen, last = c.clientIP(from, target)
		return (last == nil) == want
	})
	if !ok {
		if want {
			return "", fmt.Errorf("%s -> %s: no answer within %s: %v", from, target, timeout, last)
		}
		return seen, fmt.Errorf("%s -> %s: still answered after %s (seen as %s)", from, target, timeout, seen)
	}
	return seen, nil
}

// expect checks a connection's outcome, waiting for policy to be
// programmed. A denied connection must time out (policy drops), never be
// refused.
func (c *cluster) expect(t *testing.T, from, target string, want bool) string {
	t.Helper()
	seen, err := c.getEventually(from, target, want, 15*time.Second)
	if err != nil {
		t.Error(err)
		return ""
	}
	if !want {
		_, err := c.clientIP(from, target)
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Errorf("%s -> %s: denied, but not by a drop: %v", from, target, err)
		}
	}
	return seen
}

// refused checks that a connection is refused at once (a REJECT).
func (c *cluster) refused(t *testing.T, from, target string) {
	t.Helper()
	start := time.Now()
	_, err := c.clientIP(from, target)
	if err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("%s -> %s: want connection refused, got %v after %s", from, target, err, time.Since(start))
	}
}

// applyPolicy creates or replaces a NetworkPolicy.
func (c *cluster) applyPolicy(t *testing.T, np *networkingv1.NetworkPolicy) {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	_ = c.Client.NetworkingV1().NetworkPolicies(np.Namespace).Delete(ctx, np.Name, metav1.DeleteOptions{})
	if _, err := c.Client.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
}

func (c *cluster) deletePolicies(t *testing.T, namespace string, names ...string) {
	t.Helper()
	ctx := ctxT(t, 10*time.Second)
	for _, n := range names {
		if err := c.Client.NetworkingV1().NetworkPolicies(namespace).Delete(ctx, n, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			t.Fatal(err)
		}
	}
}

// iptablesSave returns a node's rules in one iptables backend, without
// counters, as lines.
func (c *cluster) iptablesSave(t *testing.T, node, backend string) []string {
	t.Helper()
	out, err := c.Exec(node, "iptables-"+backend+"-save")
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		l := sc.Text()
		if strings.HasPrefix(l, "#") {
			continue
		}
		// Built-in chains' declarations carry counters.
		if strings.HasPrefix(l, ":") {
			if f := strings.Fields(l); len(f) > 1 {
				l = f[0] + " " + f[1]
			}
		}
		lines = append(lines, l)
	}
	return lines
}

// linesWith keeps the lines that mention any of the words.
func linesWith(lines []string, words ...string) []string {
	var out []string
	for _, l := range lines {
		for _, w := range words {
			if strings.Contains(l, w) {
				out = append(out, l)
				break
			}
		}
	}
	return out
}

// kubeProxyNFT returns kube-proxy's nftables tables on a node, without
// counters.
func (c *cluster) kubeProxyNFT(t *testing.T, node string) string {
	t.Helper()
	out, err := c.Exec(node, "nft", "-s", "list", "table", "ip", "kube-proxy")
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// restartDaemonSet deletes the pods of a DaemonSet and waits until the
// DaemonSet is complete again.
func (c *cluster) restartDaemonSet(t *testing.T, name, selector string) {
	t.Helper()
	ctx := ctxT(t, 3*time.Minute)
	pods, err := c.Client.CoreV1().Pods(lab.AgentNamespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil || len(pods.Items) == 0 {
		t.Fatalf("pods of %s: %v (%d)", name, err, len(pods.Items))
	}
	old := map[string]bool{}
	for _, p := range pods.Items {
		old[p.Name] = true
		if err := c.Client.CoreV1().Pods(lab.AgentNamespace).Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	err = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, 3*time.Minute, true, func(ctx context.Context) (bool, error) {
		ds, err := c.Client.AppsV1().DaemonSets(lab.AgentNamespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil || !lab.DaemonSetDone(ds, len(c.Nodes)) {
			return false, nil
		}
		pods, err := c.Client.CoreV1().Pods(lab.AgentNamespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
		if err != nil {
			return false, nil
		}
		for _, p := range pods.Items {
			if old[p.Name] || !labtest.PodReady(p) {
				return false, nil
			}
		}
		return len(pods.Items) == len(c.Nodes), nil
	})
	if err != nil {
		t.Fatalf("%s did not come back: %v", name, err)
	}
}

// agentLogs joins the logs of Sluice's agents, as kubectl logs shows them.
func (c *cluster) agentLogs(t *testing.T) string {
	out, err := c.Kubectl(ctxT(t, 20*time.Second), "", "-n", lab.AgentNamespace, "logs", "-l", "app.kubernetes.io/name=sluice", "-c", "sluiced", "--tail=-1", "--prefix")
	if err != nil {
		t.Fatal(err)
	}
	return out
}
