package realnodee2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/sluice-net/sluice/internal/status"
	"github.com/sluice-net/sluice/policy"
	"github.com/sluice-net/sluice/test/labtest"
)

// sluicectl runs sluicectl from the root namespace, as on a workstation.
func sluicectl(t testing.TB, args ...string) (string, error) {
	t.Helper()
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	// --lab-dir at a lab that does not exist: only the kubeconfig may help.
	out, err := exec.Command(bins+"/sluicectl", append(args, "--lab-dir", t.TempDir())...).CombinedOutput()
	return string(out), err
}

// troubleshooter makes a ServiceAccount with no RBAC and a kubeconfig with
// its token; grant binds the README's roles to it.
func troubleshooter(t *testing.T, ctx context.Context) (kubeconfig string, grant func()) {
	t.Helper()
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "troubleshooter"}}
	if _, err := shared.Client.CoreV1().ServiceAccounts("default").Create(ctx, sa, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = shared.Client.CoreV1().ServiceAccounts("default").Delete(context.Background(), "troubleshooter", metav1.DeleteOptions{})
	})
	tok, err := shared.Client.CoreV1().ServiceAccounts("default").CreateToken(ctx, "troubleshooter", &authv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := clientcmd.LoadFromFile(shared.AdminKubeconfig())
	if err != nil {
		t.Fatal(err)
	}
	for _, ai := range cfg.AuthInfos {
		ai.Token, ai.ClientCertificate, ai.ClientKey = tok.Status.Token, "", ""
	}
	kubeconfig = filepath.Join(t.TempDir(), "troubleshooter.kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, kubeconfig); err != nil {
		t.Fatal(err)
	}
	grant = func() {
		if _, err := shared.Kubectl(ctx, "", "apply", "-f", filepath.Join(labtest.RepoRoot(), "manifests", "sluicectl-rbac.yaml")); err != nil {
			t.Fatal(err)
		}
		subject := []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "default", Name: "troubleshooter"}}
		crb := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "troubleshooter-test"}, Subjects: subject,
			RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "sluice-troubleshooter"}}
		rb := &rbacv1.RoleBinding{ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "troubleshooter-test"}, Subjects: subject,
			RoleRef: rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: "sluice-troubleshooter"}}
		if _, err := shared.Client.RbacV1().ClusterRoleBindings().Create(ctx, crb, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if _, err := shared.Client.RbacV1().RoleBindings("kube-system").Create(ctx, rb, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = shared.Client.RbacV1().ClusterRoleBindings().Delete(context.Background(), crb.Name, metav1.DeleteOptions{})
			_ = shared.Client.RbacV1().RoleBindings("kube-system").Delete(context.Background(), rb.Name, metav1.DeleteOptions{})
		})
	}
	return kubeconfig, grant
}

// TestWorkstationReachesAgentsThroughTheAPIServer: from the root namespace
// with only a kubeconfig, status, explain, drops and changes reach the agent of
// every node (port-forward into the DaemonSet's pods); without the RBAC
// the user is told which verb on which resource is forbidden.
func TestWorkstationReachesAgentsThroughTheAPIServer(t *testing.T) {
	ctx := ctxT(t, 5*time.Minute)
	createPod(t, ctx, agnhostPod("ws", "client", shared.Nodes[0].Name))
	createPod(t, ctx, agnhostPod("ws", "server", shared.Nodes[1].Name))
	kc, grant := troubleshooter(t, ctx)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"status"}, "forbidden: this kubeconfig's user may not list pods in namespace kube-system"},
		{[]string{"explain", "ws/client", "ws/server", "8080"}, "forbidden: this kubeconfig's user may not get pods in namespace ws"},
		{[]string{"drops"}, "forbidden: this kubeconfig's user may not list pods in namespace kube-system"},
	} {
		out, err := sluicectl(t, append(c.args, "--kubeconfig", kc)...)
		if err == nil || !strings.Contains(out, c.want) {
			t.Errorf("sluicectl %v without RBAC: %v\n%s\nwant %q", c.args, err, out, c.want)
		}
	}
	grant()
	var out string
	var err error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(time.Second) {
		if out, err = sluicectl(t, "status", "--kubeconfig", kc, "-o", "json"); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("status with the RBAC: %v\n%s", err, out)
	}
	var sum struct {
		Nodes []struct{ Node, Error string }
	}
	if err := json.Unmarshal([]byte(out), &sum); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var reached []string
	for _, n := range sum.Nodes {
		if n.Error != "" {
			t.Errorf("node %s unreachable: %s", n.Node, n.Error)
		}
		reached = append(reached, n.Node)
	}
	sort.Strings(reached)
	if len(reached) != len(shared.Nodes) {
		t.Errorf("status reached %v, want every node", reached)
	}
	if out, _ := sluicectl(t, "drops", "--kubeconfig", kc, "--node", shared.Nodes[0].Name); strings.Contains(out, "404 Not Found") {
		// Real nodes run the agent from the image in the tools cache.
		t.Fatalf("the sluice image in the tools cache predates explain and drops (the agent answers 404): rebuild it (make images)\n%s", out)
	}
	for _, n := range shared.Nodes {
		out, err := sluicectl(t, "status", "--kubeconfig", kc, "--node", n.Name, "-o", "json")
		var r status.Report
		if err != nil || json.Unmarshal([]byte(out), &r) != nil || r.Node != n.Name {
			t.Errorf("status --node %s: %v\n%s", n.Name, err, out)
		}
		if out, err := sluicectl(t, "drops", "--kubeconfig", kc, "--node", n.Name); err != nil {
			t.Errorf("drops --node %s: %v\n%s", n.Name, err, out)
		}
		// Every agent's journal answers; what it holds depends on what
		// the package's earlier tests did (a restarted agent finds its
		// routes in place and writes none, so it may be empty), so only that it answers.
		if out, err := sluicectl(t, "changes", "--kubeconfig", kc, "--node", n.Name); err != nil {
			t.Errorf("changes --node %s: %v\n%s", n.Name, err, out)
		}
	}
	out, err = sluicectl(t, "explain", "ws/client", "ws/server", "http", "--kubeconfig", kc, "-o", "json")
	var x policy.Explanation
	if err != nil || json.Unmarshal([]byte(out), &x) != nil {
		t.Fatalf("explain: %v\n%s", err, out)
	}
	if !x.Egress.Allowed || !x.Ingress.Allowed || x.Port != 8080 || x.Egress.Reason != policy.ReasonOpen ||
		x.Egress.Kernel == nil || x.Ingress.Kernel == nil || !x.Egress.Kernel.Programmed || !x.Ingress.Kernel.Programmed {
		t.Errorf("explain from the workstation: %s", out)
	}
	if !strings.Contains(x.Node, shared.Nodes[0].Name) || !strings.Contains(x.Node, shared.Nodes[1].Name) {
		t.Errorf("explain was not answered by both pods' nodes: %q", x.Node)
	}
}

// BenchmarkExplainFromWorkstation: sluicectl explain with the admin
// kubeconfig, as a user types it: process start, API lookups, a
// port-forward to each of the two nodes, the agents' answers and kernel
// reads; and sluicectl status --node, one node's report over the same
// path, as the baseline of the API server's share.
func BenchmarkExplainFromWorkstation(b *testing.B) {
	ctx := context.Background()
	for _, p := range []*corev1.Pod{agnhostPod("wsb", "client", shared.Nodes[0].Name), agnhostPod("wsb", "server", shared.Nodes[1].Name)} {
		_ = shared.EnsureNamespace(ctx, p.Namespace)
		if _, err := shared.Client.CoreV1().Pods(p.Namespace).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		defer shared.DeletePod(ctx, p.Namespace, p.Name)
		if _, err := shared.WaitRunning(ctx, p.Namespace, p.Name); err != nil {
			b.Fatal(err)
		}
	}
	for _, c := range []struct {
		name string
		args []string
	}{
		{"status-node", []string{"status", "--node", shared.Nodes[1].Name}},
		{"explain", []string{"explain", "wsb/client", "wsb/server", "8080"}},
	} {
		p50, p90, err := cliLatency(b, 30, append(c.args, "--kubeconfig", shared.AdminKubeconfig())...)
		if err != nil {
			b.Errorf("%s: %v", c.name, err)
			continue
		}
		b.ReportMetric(p50, c.name+"-p50-ms")
		b.Logf("%s from a workstation over 30 runs: p50 %.0f ms, p90 %.0f ms", c.name, p50, p90)
	}
}

// cliLatency runs sluicectl n times and returns the p50 and p90 in ms.
func cliLatency(b *testing.B, n int, args ...string) (p50, p90 float64, err error) {
	bins, err := labtest.Binaries()
	if err != nil {
		return 0, 0, err
	}
	var lat []time.Duration
	for i := 0; i < n; i++ {
		t0 := time.Now()
		cmd := exec.Command(bins+"/sluicectl", append(args, "--lab-dir", os.TempDir()+"/no-lab")...)
		if out, err := cmd.CombinedOutput(); err != nil {
			return 0, 0, fmt.Errorf("%v\n%s", err, out)
		}
		lat = append(lat, time.Since(t0))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	return ms(lat[n/2]), ms(lat[n*9/10]), nil
}
