package overlaye2e

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

const flannelVersion = "v0.28.10"

// TestFlannelAndSluiceNodesInOneCluster runs real flanneld on one node and
// sluiced on the others: pods on all of them reach each other. This is the
// migration path from flannel or Canal, one node at a time.
func TestFlannelAndSluiceNodesInOneCluster(t *testing.T) {
	ctx := ctxT(t)
	flanneld := filepath.Join(lab.DefaultToolsDir(), "flannel-"+flannelVersion, "flanneld")
	if _, err := os.Stat(flanneld); err != nil {
		t.Fatalf("flanneld not built (run 'make tools'): %v", err)
	}
	l := labtest.StartT(t, lab.Options{Nodes: 3, CNI: lab.CNIReference})
	const netConf = `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`
	ag, err := l.StartAgentsOn(netConf, "node-1", "node-2")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ag.StopAll)

	place, _ := l.Resolve("node-3")
	confPath := l.Path("flannel-net-conf.json")
	if err := os.WriteFile(confPath, []byte(netConf), 0o644); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(l.Path("logs", "flanneld.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := place.Command(flanneld, "--kube-subnet-mgr", "--kubeconfig-file", l.NodeKubeconfigAdmin(),
		"--iface", "eth0", "--ip-masq", "--net-config-path", confPath)
	cmd.Env = append(os.Environ(), "NODE_NAME=node-3")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })

	if err := ag.WaitReady(ctx, "node-1", "node-2"); err != nil {
		t.Fatal(err)
	}
	// flanneld is up once it wrote its subnet.env.
	if err := wait.PollUntilContextTimeout(ctx, 200*time.Millisecond, time.Minute, true, func(context.Context) (bool, error) {
		_, err := l.Exec("node-3", "test", "-s", "/run/flannel/subnet.env")
		return err == nil, nil
	}); err != nil {
		b, _ := os.ReadFile(l.Path("logs", "flanneld.log"))
		t.Fatalf("flanneld did not start: %v\n%s", err, b)
	}
	for _, n := range l.Nodes {
		node, err := l.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := lab.WriteReferenceConflist(n, node.Spec.PodCIDRs, 1450); err != nil {
			t.Fatal(err)
		}
	}
	names := []string{"mix/sluice-1", "mix/sluice-2", "mix/flannel-3"}
	for i, p := range names {
		if _, err := l.CreatePod(ctx, labtest.PodSpec{Namespace: "mix", Name: strings.TrimPrefix(p, "mix/"), Node: l.Nodes[i].Name,
			Ports: []corev1.ContainerPort{{ContainerPort: 80}}}); err != nil {
			t.Fatal(err)
		}
	}
	for _, from := range names {
		for _, to := range names {
			for _, udp := range []bool{false, true} {
				got, err := l.ProbeEventually(from, to, 80, udp, false, 10*time.Second)
				if err != nil || got != to {
					t.Errorf("%s -> %s udp=%v: %q %v", from, to, udp, got, err)
				}
			}
		}
	}
	if t.Failed() {
		b, _ := os.ReadFile(l.Path("logs", "flanneld.log"))
		t.Logf("flanneld log:\n%s", b)
	}
}
