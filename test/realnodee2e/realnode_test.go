// Package realnodee2e runs Sluice on real nodes: a lab started with
// --runtime containerd, whose nodes run the kubelet of Kubernetes v1.36.3
// and containerd, with images built here from the repository's Dockerfile.
// The manifest's DaemonSet runs as real containers; containerd calls the
// conflist that its init container installs for every pod sandbox, and
// the tests reach into pods with kubectl exec, as the public suites do.
package realnodee2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// shared is a 3-node dual-stack lab of real nodes with Sluice installed
// from its manifest.
var shared *labtest.Lab

// Agnhost is the test image built by test/tools/images.sh.
const Agnhost = "registry.k8s.io/e2e-test-images/agnhost:2.63.0"

func TestMain(m *testing.M) {
	if reason := missing(); reason != "" {
		// Only what cannot exist here skips: not root, or no containerd.
		fmt.Println("realnodee2e: skipped:", reason)
		os.Exit(0)
	}
	labtest.Main(m, lab.Options{Nodes: 3, IPv6: true, Runtime: lab.RuntimeContainerd, Timeout: 5 * time.Minute}, &shared)
}

// missing says why real nodes cannot run on this machine, or "".
func missing() string {
	if os.Geteuid() != 0 {
		return "real nodes need root (network and mount namespaces, cgroups)"
	}
	for _, c := range []string{"containerd", "runc", "ctr", "nsenter"} {
		if _, err := exec.LookPath(c); err != nil {
			return c + " is not installed (make deps installs it)"
		}
	}
	return ""
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// agnhostPod is a pod serving agnhost netexec: HTTP on TCP 8080 and an
// echo of its hostname on UDP 8081.
func agnhostPod(namespace, name, node string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: name, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			TerminationGracePeriodSeconds: new(int64),
			Containers: []corev1.Container{{
				Name:            "agnhost",
				Image:           Agnhost,
				ImagePullPolicy: corev1.PullNever,
				Args:            []string{"netexec", "--http-port=8080", "--udp-port=8081"},
				Ports: []corev1.ContainerPort{
					{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP},
					{Name: "udp", ContainerPort: 8081, Protocol: corev1.ProtocolUDP},
				},
			}},
		},
	}
}

func createPod(t *testing.T, ctx context.Context, pod *corev1.Pod) *corev1.Pod {
	t.Helper()
	if err := shared.EnsureNamespace(ctx, pod.Namespace); err != nil {
		t.Fatal(err)
	}
	if _, err := shared.Client.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating pod %s/%s: %v", pod.Namespace, pod.Name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_ = shared.DeletePod(ctx, pod.Namespace, pod.Name)
	})
	got, err := shared.WaitRunning(ctx, pod.Namespace, pod.Name)
	if err != nil {
		t.Fatalf("%v; events: %s", err, events(ctx, pod.Namespace, pod.Name))
	}
	return got
}

func events(ctx context.Context, namespace, name string) string {
	out, _ := shared.Kubectl(ctx, "", "-n", namespace, "get", "events", "--field-selector", "involvedObject.name="+name, "-o", "custom-columns=REASON:.reason,MESSAGE:.message", "--no-headers")
	return strings.TrimSpace(out)
}

// connect runs `agnhost connect` in a pod through kubectl exec.
func connect(ctx context.Context, namespace, pod, proto, ip string, port int) error {
	addr := fmt.Sprintf("%s:%d", ip, port)
	if strings.Contains(ip, ":") {
		addr = fmt.Sprintf("[%s]:%d", ip, port)
	}
	_, err := shared.Kubectl(ctx, "", "-n", namespace, "exec", pod, "--", "/agnhost", "connect", "--timeout=3s", "--protocol="+proto, addr)
	return err
}

func connectEventually(ctx context.Context, namespace, pod, proto, ip string, port int, timeout time.Duration) error {
	var last error
	_ = wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, timeout, true, func(ctx context.Context) (bool, error) {
		last = connect(ctx, namespace, pod, proto, ip, port)
		return last == nil, nil
	})
	return last
}

func TestNodesRunContainerd(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	nodes, err := shared.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(nodes.Items) != 3 {
		t.Fatalf("got %d nodes, want 3", len(nodes.Items))
	}
	for _, n := range nodes.Items {
		rt := n.Status.NodeInfo.ContainerRuntimeVersion
		if !strings.HasPrefix(rt, "containerd://") {
			t.Errorf("node %s runtime %q, want containerd://", n.Name, rt)
		}
		if v := n.Status.NodeInfo.KubeletVersion; v != "v1.36.3" {
			t.Errorf("node %s kubelet %q, want v1.36.3", n.Name, v)
		}
	}
}

// TestAgentsRunTheDockerfileImage compares the image ID of every sluice
// container with the ID of the image buildah built from the Dockerfile.
func TestAgentsRunTheDockerfileImage(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	imgs, err := lab.Images(shared.ToolsDir)
	if err != nil {
		t.Fatal(err)
	}
	var want string
	for _, img := range imgs {
		if strings.HasPrefix(img.Ref, "ghcr.io/sluice-net/sluice:") {
			want = img.ID
		}
	}
	if want == "" {
		t.Fatalf("no sluice image in %s", lab.ImageListPath(shared.ToolsDir))
	}
	pods, err := shared.Client.CoreV1().Pods(lab.AgentNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=sluice"})
	if err != nil {
		t.Fatal(err)
	}
	if len(pods.Items) != 3 {
		t.Fatalf("got %d sluice pods, want 3", len(pods.Items))
	}
	for _, p := range pods.Items {
		for _, st := range append(p.Status.InitContainerStatuses, p.Status.ContainerStatuses...) {
			if st.ImageID != want {
				t.Errorf("pod %s container %s runs image ID %q, want the Dockerfile build %q", p.Name, st.Name, st.ImageID, want)
			}
			if !strings.HasPrefix(st.ContainerID, "containerd://") {
				t.Errorf("pod %s container %s has ID %q, want a containerd container", p.Name, st.Name, st.ContainerID)
			}
		}
	}
}

// TestPodsConnectAcrossNodes: agnhost pods on 3 nodes reach each other
// over TCP and UDP, IPv4 and IPv6, through kubectl exec of agnhost connect.
func TestPodsConnectAcrossNodes(t *testing.T) {
	ctx := ctxT(t, 5*time.Minute)
	var pods []*corev1.Pod
	for i, n := range shared.Nodes {
		pods = append(pods, createPod(t, ctx, agnhostPod("conn", fmt.Sprintf("p%d", i+1), n.Name)))
	}
	for _, from := range pods {
		for _, to := range pods {
			if from == to {
				continue
			}
			if len(to.Status.PodIPs) != 2 {
				t.Fatalf("pod %s has IPs %v, want IPv4 and IPv6", to.Name, to.Status.PodIPs)
			}
			for _, ip := range to.Status.PodIPs {
				for _, c := range []struct {
					proto string
					port  int
				}{{"tcp", 8080}, {"udp", 8081}} {
					if err := connectEventually(ctx, "conn", from.Name, c.proto, ip.IP, c.port, 30*time.Second); err != nil {
						t.Errorf("%s (%s) -> %s (%s) %s %s: %v", from.Name, from.Spec.NodeName, to.Name, to.Spec.NodeName, c.proto, ip.IP, err)
					}
				}
			}
		}
	}
	// A control: a port nobody serves is refused, so connect can fail.
	if err := connect(ctx, "conn", pods[0].Name, "tcp", pods[1].Status.PodIP, 9); err == nil {
		t.Errorf("connect to a closed port succeeded; the probe cannot fail")
	}
}

// TestAgentLogsAndExec: kubectl logs and exec of the sluice container,
// served by the kubelet's port 10250 and containerd's stream server.
func TestAgentLogsAndExec(t *testing.T) {
	ctx := ctxT(t, time.Minute)
	pods, err := shared.Client.CoreV1().Pods(lab.AgentNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=sluice"})
	if err != nil || len(pods.Items) == 0 {
		t.Fatalf("listing sluice pods: %v (%d)", err, len(pods.Items))
	}
	p := pods.Items[0]
	logs, err := shared.Kubectl(ctx, "", "-n", lab.AgentNamespace, "logs", p.Name, "-c", "sluiced")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs, p.Spec.NodeName) {
		t.Errorf("the sluiced log of %s does not name its node %s:\n%s", p.Name, p.Spec.NodeName, logs)
	}
	out, err := shared.Kubectl(ctx, "", "-n", lab.AgentNamespace, "exec", p.Name, "-c", "sluiced", "--", "/opt/sluice/bin/sluiced", "--help")
	if err != nil && !strings.Contains(out, "Usage") {
		t.Fatal(err)
	}
	// The container's own tools and filesystem: the image's iptables.
	out, err = shared.Kubectl(ctx, "", "-n", lab.AgentNamespace, "exec", p.Name, "-c", "sluiced", "--", "iptables", "--version")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "iptables v") {
		t.Errorf("iptables --version in the sluiced container: %q", out)
	}
}

// TestDeletePodReleasesIP: kubectl delete makes containerd call CNI DEL,
// and host-local's reservation of the pod's IP goes.
func TestDeletePodReleasesIP(t *testing.T) {
	ctx := ctxT(t, 3*time.Minute)
	node := shared.Nodes[0]
	pod := createPod(t, ctx, agnhostPod("release", "victim", node.Name))
	reserved := func(ip string) bool {
		out, _ := shared.Exec(node.Name, "sh", "-c", "ls /var/lib/cni/networks/*/")
		return strings.Contains(out, ip)
	}
	ip := pod.Status.PodIP
	if !reserved(ip) {
		t.Fatalf("IP %s of a running pod is not reserved in host-local's store on %s; the check cannot fail", ip, node.Name)
	}
	if _, err := shared.Kubectl(ctx, "", "-n", "release", "delete", "pod", "victim", "--wait=true"); err != nil {
		t.Fatal(err)
	}
	if !labtest.Eventually(30*time.Second, func() bool { return !reserved(ip) }) {
		t.Errorf("IP %s still reserved on %s after the pod was deleted", ip, node.Name)
	}
}
