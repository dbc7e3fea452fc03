// Package uninstalle2e proves the uninstall procedure in a lab running
// Sluice with pods and a NetworkPolicy: with the agents stopped,
// `sluiced --cleanup` and `sluice uninstall` on every node leave nothing of
// Sluice on any node or on the Nodes, and keep another program's rules.
package uninstalle2e

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"

	"github.com/sluice-net/sluice/internal/cleanup"
	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/overlay/lease"
	"github.com/sluice-net/sluice/test/labtest"
)

var saveBinaries = []string{"iptables-nft-save", "ip6tables-nft-save", "iptables-legacy-save", "ip6tables-legacy-save"}

// foreignRules are another program's; they must survive.
var foreignRules = [][]string{{"-N", "FOREIGN"}, {"-A", "FOREIGN", "-j", "ACCEPT"}, {"-A", "FORWARD", "-j", "FOREIGN"}}

var (
	sluiceLink = regexp.MustCompile(`(?m)^\d+: (vx6?-sluice\.\d+|sl[0-9a-f]{11})[@:]`)
	// Files `sluice install`, the plugin, host-local and the agent write on
	// a lab node. The reference plugins install copies over were there
	// before (a lab node has them, as a distribution's package would), so
	// they stay.
	sluiceFiles = []string{"/etc/cni/net.d/10-sluice.conflist", "/etc/cni/net.d/sluice-install.manifest", "/opt/cni/bin/sluice",
		"/var/lib/cni/sluice", "/var/lib/cni/networks/sluice", "/run/sluice", "/var/lib/sluice"}
)

// leftovers lists what of Sluice is still on a node, and which of the
// other program's rules are gone.
func leftovers(t *testing.T, l *labtest.Lab, node string) []string {
	var left []string
	exec := func(argv ...string) string {
		out, err := l.Exec(node, argv...)
		if err != nil {
			t.Fatalf("%s: %v", node, err)
		}
		return out
	}
	for _, m := range sluiceLink.FindAllStringSubmatch(exec("ip", "-o", "link", "show"), -1) {
		left = append(left, "link "+m[1])
	}
	for _, fam := range []string{"-4", "-6"} {
		for _, r := range strings.Split(exec("ip", fam, "route", "show", "table", "all"), "\n") {
			if strings.Contains(r, "proto 98") || strings.HasPrefix(r, "blackhole") || strings.Contains(r, " dev sl") || strings.Contains(r, "sluice") {
				left = append(left, "route "+r)
			}
		}
	}
	for _, bin := range saveBinaries {
		out := exec(bin)
		for _, r := range strings.Split(out, "\n") {
			if strings.Contains(strings.ToUpper(r), "SLUICE") {
				left = append(left, bin+": "+r)
			}
		}
		if strings.HasPrefix(bin, "iptables-nft") && !strings.Contains(out, "-A FORWARD -j FOREIGN") {
			left = append(left, bin+": another program's rule is gone")
		}
	}
	for _, s := range strings.Fields(exec("ipset", "list", "-n")) {
		if strings.HasPrefix(s, cleanup.ChainPrefix) {
			left = append(left, "ipset "+s)
		}
	}
	for _, f := range sluiceFiles {
		if _, err := l.Exec(node, "test", "!", "-e", f); err != nil {
			left = append(left, "file "+f)
		}
	}
	if _, err := l.Exec(node, "test", "-x", "/opt/cni/bin/host-local"); err != nil {
		left = append(left, "the distribution's host-local is gone")
	}
	return left
}

func TestUninstallLeavesNothing(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	l := labtest.StartT(t, lab.Options{Nodes: 3, IPv6: true, CNI: lab.CNISluice})
	for i, n := range l.Nodes {
		if _, err := l.CreatePod(ctx, labtest.PodSpec{Namespace: "un", Name: fmt.Sprintf("p%d", i+1), Node: n.Name,
			Labels: map[string]string{"app": "web"}, Ports: []corev1.ContainerPort{{ContainerPort: 80}}}); err != nil {
			t.Fatal(err)
		}
		for _, args := range foreignRules {
			if _, err := l.Exec(n.Name, append([]string{"iptables-nft"}, args...)...); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A policy with a peer selector, so the nodes hold policy chains and
	// ipsets too.
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "un", Name: "web-from-web"}, Spec: networkingv1.NetworkPolicySpec{
		PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
		Ingress:     []networkingv1.NetworkPolicyIngressRule{{From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}}}}}},
	}}
	if _, err := l.Client.NetworkingV1().NetworkPolicies("un").Create(ctx, np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// A subnet claim of node-1, as the agent makes on a cluster without
	// podCIDRs, and another program's Lease next to it.
	for _, ls := range []*coordinationv1.Lease{
		{ObjectMeta: metav1.ObjectMeta{Name: "sluice-subnet-10-244-200-0-24", Namespace: lease.Namespace, Labels: map[string]string{lease.ClaimLabel: "true"}},
			Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To("node-1")}},
		{ObjectMeta: metav1.ObjectMeta{Name: "someone-else", Namespace: lease.Namespace}, Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To("node-1")}},
	} {
		if _, err := l.Client.CoordinationV1().Leases(lease.Namespace).Create(ctx, ls, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// Everything the test later proves gone must be there first.
	for _, n := range l.Nodes {
		var before []string
		if !labtest.Eventually(30*time.Second, func() bool {
			before = leftovers(t, l, n.Name)
			return strings.Contains(strings.Join(before, "\n"), "ipset SLUICE-S")
		}) {
			t.Fatalf("%s never got the policy's ipset; it has %v", n.Name, before)
		}
		joined := strings.Join(before, "\n")
		for _, want := range []string{"link vx-sluice.1", "link vx6-sluice.1", "link sl", "proto 98", "-A FORWARD", "-A POSTROUTING", "SLUICE-PI-", "file /run/sluice"} {
			if !strings.Contains(joined, want) {
				t.Fatalf("%s lacks %q before the uninstall:\n%s", n.Name, want, joined)
			}
		}
	}

	// The procedure: the DaemonSet is gone (here: the agents are stopped
	// and kept down), then on every node the cleanup and the uninstall.
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	// While an agent runs, the cleanup refuses: the agent would put
	// everything back.
	out, err := l.Exec("node-1", filepath.Join(bins, "sluiced"), "--cleanup", "--kubeconfig", l.NodeKubeconfigAdmin(), "--node-name", "node-1")
	if err == nil || !strings.Contains(out, "sluiced is still running on this node") {
		t.Fatalf("sluiced --cleanup beside a running agent: %v\n%s", err, out)
	}
	if links, _ := l.Exec("node-1", "ip", "-o", "link", "show"); !strings.Contains(links, "vx-sluice.1") {
		t.Fatal("the refused cleanup removed the tunnel device")
	}
	for _, n := range l.Nodes {
		if err := l.StopLabAgent(n.Name); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range l.Nodes {
		cleanupCmd := []string{filepath.Join(bins, "sluiced"), "--cleanup", "--kubeconfig", l.NodeKubeconfigAdmin(), "--node-name", n.Name}
		if out, err := l.Exec(n.Name, cleanupCmd...); err != nil {
			t.Fatalf("sluiced --cleanup on %s: %v\n%s", n.Name, err, out)
		}
		if out, err := l.Exec(n.Name, filepath.Join(bins, "sluice"), "uninstall", "--cni-bin-dir", "/opt/cni/bin", "--cni-conf-dir", "/etc/cni/net.d", "--cni-state-dir", "/var/lib/cni"); err != nil {
			t.Fatalf("sluice uninstall on %s: %v\n%s", n.Name, err, out)
		}
		// Running the cleanup again is harmless.
		if out, err := l.Exec(n.Name, cleanupCmd...); err != nil {
			t.Errorf("second sluiced --cleanup on %s: %v\n%s", n.Name, err, out)
		}
	}
	for _, n := range l.Nodes {
		for _, left := range leftovers(t, l, n.Name) {
			t.Errorf("%s: %s", n.Name, left)
		}
		node, err := l.Client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for k := range node.Annotations {
			for _, p := range cleanup.AnnotationPrefixes {
				if strings.HasPrefix(k, p) {
					t.Errorf("%s: annotation %s remains", n.Name, k)
				}
			}
		}
	}
	leases, err := l.Client.CoordinationV1().Leases(lease.Namespace).List(ctx, metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, ls := range leases.Items {
		names = append(names, ls.Name)
	}
	if got := strings.Join(names, " "); strings.Contains(got, "sluice-subnet-") || !strings.Contains(got, "someone-else") {
		t.Errorf("leases after the uninstall: %s; want the claim gone and someone-else kept", got)
	}
}
