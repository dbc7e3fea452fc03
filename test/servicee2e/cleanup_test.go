package servicee2e

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// cleanupLeavesKubeProxy runs last: the DaemonSet goes, `sluiced
// --cleanup` and `sluice uninstall` run on node-1, and kube-proxy's rules (iptables in the given
// backend, or its nftables table when backend is "") are exactly as before,
// while nothing of Sluice's is left in either iptables backend.
func (c *cluster) cleanupLeavesKubeProxy(t *testing.T, backend string) {
	ctx := ctxT(t, 3*time.Minute)
	// The cleanup takes node-1's pods off the network; CoreDNS would then
	// fail its readiness probe and kube-proxy would rewrite its Service.
	// Without CoreDNS, nothing kube-proxy programs changes meanwhile.
	scale, err := c.Client.AppsV1().Deployments(lab.AgentNamespace).GetScale(ctx, lab.CoreDNSDeployment, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	scale.Spec.Replicas = 0
	if _, err := c.Client.AppsV1().Deployments(lab.AgentNamespace).UpdateScale(ctx, lab.CoreDNSDeployment, scale, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubeProxyRules := func() []string {
		if backend == "" {
			return strings.Split(c.kubeProxyNFT(t, "node-1"), "\n")
		}
		return linesWith(c.iptablesSave(t, "node-1", backend), "KUBE-")
	}
	dnsEndpoints := func() bool {
		for _, l := range kubeProxyRules() {
			if strings.Contains(l, "kube-dns") && strings.Contains(l, "10.244.") {
				return true
			}
		}
		return false
	}
	if !labtest.Eventually(time.Minute, func() bool { return !dnsEndpoints() }) {
		t.Fatal("kube-proxy still programs CoreDNS's endpoints")
	}
	time.Sleep(2 * time.Second)
	before := kubeProxyRules()

	if out, err := c.Kubectl(ctx, "", "-n", lab.AgentNamespace, "delete", "daemonset", lab.AgentDaemonSet, "--wait=true"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !labtest.Eventually(time.Minute, func() bool { pid, _ := c.AgentPID("node-1"); return pid == 0 }) {
		t.Fatal("sluiced still runs on node-1")
	}
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	if out, err := c.Exec("node-1", filepath.Join(bins, "sluiced"), "--cleanup", "--kubeconfig", c.NodeKubeconfigAdmin(), "--node-name", "node-1"); err != nil {
		t.Fatalf("sluiced --cleanup: %v\n%s", err, out)
	}
	if out, err := c.Exec("node-1", filepath.Join(bins, "sluice"), "uninstall", "--cni-bin-dir", "/opt/cni/bin", "--cni-conf-dir", "/etc/cni/net.d", "--cni-state-dir", "/var/lib/cni"); err != nil {
		t.Fatalf("sluice uninstall: %v\n%s", err, out)
	}
	if after := kubeProxyRules(); !slices.Equal(before, after) {
		t.Errorf("the cleanup changed kube-proxy's rules:\nbefore:\n%s\nafter:\n%s", strings.Join(before, "\n"), strings.Join(after, "\n"))
	}
	if len(before) < 10 {
		t.Errorf("only %d kube-proxy rules to compare: the test cannot tell", len(before))
	}
	for _, b := range []string{"nft", "legacy"} {
		if left := linesWith(c.iptablesSave(t, "node-1", b), "SLUICE"); len(left) > 0 {
			t.Errorf("iptables-%s keeps Sluice's rules after the cleanup:\n%s", b, strings.Join(left, "\n"))
		}
	}
}
