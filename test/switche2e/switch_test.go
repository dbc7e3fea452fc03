// Package switche2e follows the README's procedure for switching a
// cluster's overlay between vxlan and wireguard, on a lab that runs
// Sluice's DaemonSet: change Backend in the ConfigMap, restart every agent
// at once; pods reach each other again over the new backend, and back.
package switche2e

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

var shared *labtest.Lab

func TestMain(m *testing.M) {
	// The lab's manifest runs vxlan, whatever SLUICE_LAB_BACKEND says.
	labtest.Main(m, lab.Options{Nodes: 2, Backend: "vxlan"}, &shared, startPods)
}

var pods = []string{"sw/a", "sw/b"}

func startPods(l *labtest.Lab) (func(), error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for i, p := range pods {
		nsName, name, _ := strings.Cut(p, "/")
		if _, err := l.CreatePod(ctx, labtest.PodSpec{Namespace: nsName, Name: name, Node: l.Nodes[i].Name,
			Ports: []corev1.ContainerPort{{ContainerPort: 80}}}); err != nil {
			return nil, err
		}
	}
	return nil, nil
}

// switchTo writes the backend into the ConfigMap and restarts every
// agent at once, then waits until every node announces it and its agent
// is Ready.
func switchTo(t *testing.T, backend string) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cms := shared.Client.CoreV1().ConfigMaps(lab.AgentNamespace)
	cm, err := cms.Get(ctx, "sluice", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	conf := cm.Data["net-conf.json"]
	for _, old := range []string{`"vxlan"`, `"wireguard"`} {
		conf = strings.ReplaceAll(conf, `"Type": `+old, `"Type": "`+backend+`"`)
	}
	if !strings.Contains(conf, `"Type": "`+backend+`"`) {
		t.Fatalf("net-conf.json has no Backend.Type to change: %s", conf)
	}
	cm.Data["net-conf.json"] = conf
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	before, err := shared.AgentPods(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range before {
		if err := shared.Client.CoreV1().Pods(lab.AgentNamespace).Delete(ctx, p.Name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if !labtest.Eventually(2*time.Minute, func() bool {
		now, err := shared.AgentPods(ctx)
		if err != nil || len(now) != len(shared.Nodes) {
			return false
		}
		for node, p := range now {
			if p.UID == before[node].UID || !labtest.PodReady(p) {
				return false
			}
			n, err := shared.Client.CoreV1().Nodes().Get(ctx, node, metav1.GetOptions{})
			if err != nil || n.Annotations["flannel.alpha.coreos.com/backend-type"] != backend {
				return false
			}
		}
		return true
	}) {
		t.Fatalf("the agents did not all come back with the %s backend", backend)
	}
}

func reach(t *testing.T, what string) {
	t.Helper()
	for _, from := range pods {
		for _, to := range pods {
			if got, err := shared.ProbeEventually(from, to, 80, false, false, 20*time.Second); err != nil || got != to {
				t.Errorf("%s: %s -> %s: %q, %v", what, from, to, got, err)
			}
		}
	}
}

func TestSwitchVXLANToWireGuardAndBack(t *testing.T) {
	reach(t, "vxlan")
	switchTo(t, "wireguard")
	reach(t, "wireguard")
	if links, err := shared.Exec("node-1", "ip", "-o", "link", "show"); err != nil || !strings.Contains(links, "wg-sluice") || strings.Contains(links, "vx-sluice.1:") {
		t.Errorf("node-1 after the switch to wireguard (want wg-sluice, no vx-sluice.1): %v\n%s", err, links)
	}
	switchTo(t, "vxlan")
	reach(t, "vxlan again")
	if links, err := shared.Exec("node-1", "ip", "-o", "link", "show"); err != nil || strings.Contains(links, "wg-sluice") || !strings.Contains(links, "vx-sluice.1") {
		t.Errorf("node-1 after the switch back (want vx-sluice.1, no wg-sluice): %v\n%s", err, links)
	}
}
