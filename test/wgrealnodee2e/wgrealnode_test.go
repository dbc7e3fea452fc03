// Package wgrealnodee2e runs the wireguard backend on real nodes: a lab
// started with --runtime containerd --backend wireguard, whose agents are
// the manifest's DaemonSet, containers of the image built from the
// Dockerfile. The userspace implementation runs inside those containers
// (this kernel has no WireGuard). Pods on two nodes reach each other over
// TCP and UDP, IPv4 and IPv6; cluster DNS answers across the tunnel; the
// underlay carries nothing in the clear; and a restarted agent pod keeps
// an established connection and its key.
package wgrealnodee2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/net/dns/dnsmessage"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

var shared *labtest.Lab

// pods: one per node, agnhost porter answering on TCP 80 and UDP 81.
var pods = []string{"wgrn/a", "wgrn/b"}

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("wgrealnodee2e: skipped: real nodes need root")
		os.Exit(0)
	}
	for _, c := range []string{"containerd", "runc", "ctr", "nsenter"} {
		if _, err := exec.LookPath(c); err != nil {
			fmt.Printf("wgrealnodee2e: skipped: %s is not installed (make deps installs it)\n", c)
			os.Exit(0)
		}
	}
	labtest.Main(m, lab.Options{Nodes: 2, IPv6: true, Runtime: lab.RuntimeContainerd, Backend: "wireguard", Timeout: 5 * time.Minute}, &shared, startPods)
}

func startPods(l *labtest.Lab) (func(), error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for i, p := range pods {
		namespace, name, _ := strings.Cut(p, "/")
		if _, err := l.CreatePod(ctx, labtest.PodSpec{Namespace: namespace, Name: name, Node: l.Nodes[i].Name,
			Ports: []corev1.ContainerPort{{ContainerPort: 80}, {ContainerPort: 81, Protocol: corev1.ProtocolUDP}}}); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

// The DaemonSet's container chose the userspace implementation, says why,
// and runs the device in the node's namespace with WireGuard's MTU.
func TestAgentContainerRunsUserspaceWireGuard(t *testing.T) {
	for _, node := range []string{"node-1", "node-2"} {
		r := shared.AgentStatus(t, node)
		if r.Overlay.Backend != "wireguard" || r.Overlay.Implementation != "userspace" || !strings.Contains(r.Overlay.ImplementationWhy, "kernel has no WireGuard") {
			t.Errorf("%s: backend %q implementation %q (%s)", node, r.Overlay.Backend, r.Overlay.Implementation, r.Overlay.ImplementationWhy)
		}
		// Dual-stack: the IPv6 overhead decides, 1500 - 80.
		if r.Overlay.MTU != 1420 {
			t.Errorf("%s: MTU %d, want 1420", node, r.Overlay.MTU)
		}
		out, err := shared.Exec(node, "ip", "-o", "link", "show", "wg-sluice")
		if err != nil || !strings.Contains(out, "mtu 1420") {
			t.Errorf("%s: wg-sluice: %v %s", node, err, out)
		}
		keys := 0
		for _, p := range r.Overlay.Peers {
			if p.PublicKey != "" && p.Problem == "" {
				keys++
			}
		}
		if keys != 2 { // one peer, two families
			t.Errorf("%s: peers with keys: %d, want 2: %+v", node, keys, r.Overlay.Peers)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	// Readiness is probed every few seconds: wait for it.
	var agents map[string]corev1.Pod
	ready := labtest.Eventually(60*time.Second, func() bool {
		var err error
		agents, err = shared.AgentPods(ctx)
		if err != nil || len(agents) != 2 {
			return false
		}
		for _, p := range agents {
			if !labtest.PodReady(p) || len(p.Status.ContainerStatuses) == 0 || p.Status.ContainerStatuses[0].ContainerID == "" {
				return false
			}
		}
		return true
	})
	if !ready {
		for node, p := range agents {
			t.Errorf("%s: the agent is not a Ready container: %+v", node, p.Status.Conditions)
		}
	}
}

func TestPodsReachEachOtherAcrossNodes(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, from := range pods {
			for _, to := range pods {
				got, err := shared.ProbeEventually(from, to, 80, false, v6, 10*time.Second)
				if err != nil || !strings.Contains(got, to) {
					t.Errorf("%s -> %s TCP ipv6=%v: %q %v", from, to, v6, got, err)
				}
				got, err = shared.Probe(from, to, 81, true, v6)
				if err != nil || !strings.Contains(got, to) {
					t.Errorf("%s -> %s UDP ipv6=%v: %q %v", from, to, v6, got, err)
				}
			}
		}
	}
}

func TestEncryptedOnTheUnderlay(t *testing.T) {
	labtest.AssertEncryptedOnTheUnderlay(t, shared, pods[0], pods[1], 81)
}

// Cluster DNS across the tunnel: a pod on node-1 asks the CoreDNS replica
// on node-2 directly, and the kube-dns Service (kube-proxy's DNAT).
func TestClusterDNSAcrossTheTunnel(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	remote, err := dnsReplicaOn(ctx, t, "node-2")
	if err != nil {
		t.Fatal(err)
	}
	for _, server := range []string{"10.96.0.10", remote} {
		var got netip.Addr
		ok := labtest.Eventually(20*time.Second, func() bool {
			got, err = lookupA(pods[0], server, "kubernetes.default.svc.cluster.local.")
			return err == nil
		})
		if !ok || got != netip.MustParseAddr("10.96.0.1") {
			t.Errorf("%s asks %s for kubernetes.default: %v, %v", pods[0], server, got, err)
		}
	}
}

// dnsReplicaOn returns the address of a Ready CoreDNS replica on node.
// The Deployment only prefers spreading its replicas (kubeadm's
// anti-affinity), so when node-1 became Ready first both can run there;
// then one of them is deleted, and its replacement goes where no replica
// runs, as an operator rebalancing the Deployment would do it.
func dnsReplicaOn(ctx context.Context, t *testing.T, node string) (string, error) {
	pods := shared.Client.CoreV1().Pods("kube-system")
	moved := false
	for {
		list, err := pods.List(ctx, metav1.ListOptions{LabelSelector: "k8s-app=kube-dns"})
		if err != nil {
			return "", fmt.Errorf("listing the CoreDNS replicas: %w", err)
		}
		var elsewhere []corev1.Pod
		for _, p := range list.Items {
			switch {
			case p.DeletionTimestamp != nil:
			case p.Spec.NodeName == node && labtest.PodReady(p) && p.Status.PodIP != "":
				return p.Status.PodIP, nil
			case p.Spec.NodeName != node && p.Spec.NodeName != "":
				elsewhere = append(elsewhere, p)
			}
		}
		if !moved && len(elsewhere) == len(list.Items) && len(elsewhere) > 1 {
			t.Logf("both CoreDNS replicas run on %s; deleting %s so that its replacement goes to %s", elsewhere[0].Spec.NodeName, elsewhere[0].Name, node)
			if err := pods.Delete(ctx, elsewhere[0].Name, metav1.DeleteOptions{}); err != nil {
				return "", fmt.Errorf("deleting a CoreDNS replica: %w", err)
			}
			moved = true
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("no Ready CoreDNS replica on %s (%d replicas): %w", node, len(list.Items), ctx.Err())
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// lookupA sends one DNS query for name's A record from a pod to a server
// and returns the first address of the answer. The socket is made in the
// pod's namespace, where it stays.
func lookupA(from, server, name string) (netip.Addr, error) {
	place, err := shared.Resolve(from)
	if err != nil {
		return netip.Addr{}, err
	}
	var conn net.Conn
	if err := ns.WithNetNSPath(place.NetNSPath, func(ns.NetNS) error {
		conn, err = net.Dial("udp", net.JoinHostPort(server, "53"))
		return err
	}); err != nil {
		return netip.Addr{}, err
	}
	defer conn.Close()
	q := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: 0x51ce, RecursionDesired: true})
	_ = q.StartQuestions()
	_ = q.Question(dnsmessage.Question{Name: dnsmessage.MustNewName(name), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET})
	msg, err := q.Finish()
	if err != nil {
		return netip.Addr{}, err
	}
	_ = conn.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := conn.Write(msg); err != nil {
		return netip.Addr{}, err
	}
	buf := make([]byte, 1500)
	n, err := conn.Read(buf)
	if err != nil {
		return netip.Addr{}, err
	}
	var p dnsmessage.Parser
	if _, err := p.Start(buf[:n]); err != nil {
		return netip.Addr{}, err
	}
	_ = p.SkipAllQuestions()
	for {
		h, err := p.AnswerHeader()
		if err != nil {
			return netip.Addr{}, fmt.Errorf("no A record in the answer: %w", err)
		}
		if h.Type != dnsmessage.TypeA {
			_ = p.SkipAnswer()
			continue
		}
		a, err := p.AResource()
		if err != nil {
			return netip.Addr{}, err
		}
		return netip.AddrFrom4(a.A), nil
	}
}

// Deleting node-1's agent pod: the DaemonSet starts a new container,
// which reopens the TUN device the old one left in the node's namespace
// and configures it with the same key; an established TCP connection
// across the tunnel goes on.
func TestAgentPodRestartKeepsConnectionAndKey(t *testing.T) {
	send := shared.EchoConn(t, pods[0], pods[1], 8100, 20*time.Second)
	if err := send("before"); err != nil {
		t.Fatal(err)
	}
	before := shared.AgentStatus(t, "node-1")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	agents, err := shared.AgentPods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	old := agents["node-1"]
	start := time.Now()
	if err := shared.Client.CoreV1().Pods(old.Namespace).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if !labtest.Eventually(2*time.Minute, func() bool {
		agents, err := shared.AgentPods(ctx)
		p, ok := agents["node-1"]
		return err == nil && ok && p.UID != old.UID && labtest.PodReady(p)
	}) {
		t.Fatal("the DaemonSet's new agent on node-1 did not become Ready")
	}
	t.Logf("agent pod deleted to its successor Ready: %v", time.Since(start))
	if err := send("after"); err != nil {
		t.Errorf("TCP connection across the agent pod's restart: %v", err)
	}
	if after := shared.AgentStatus(t, "node-1").Overlay.PublicKey; after != before.Overlay.PublicKey {
		t.Errorf("the restart changed the key: %s -> %s", before.Overlay.PublicKey, after)
	}
}
