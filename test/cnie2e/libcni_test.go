package cnie2e

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/test/labtest"
)

// nodeRuntime lets the test process act as a node's container runtime:
// libcni runs here, and each plugin it calls runs in the node's mount and
// network namespaces through a small wrapper, as it would under containerd
// on that node.
type nodeRuntime struct {
	*invoke.RawExec
	version.PluginDecoder
	wrappers string
	node     string
}

func newNodeRuntime(t *testing.T, node string) *nodeRuntime {
	n, _ := shared.Node(node)
	r := &nodeRuntime{RawExec: &invoke.RawExec{Stderr: os.Stderr}, wrappers: t.TempDir(), node: node}
	for _, p := range []string{"sluice", "host-local", "portmap", "bandwidth", "loopback"} {
		script := fmt.Sprintf("#!/bin/sh\nexec nsenter --mount=/proc/%d/ns/mnt --net=/proc/%d/ns/net -- /opt/cni/bin/%s \"$@\"\n", n.KubeletPID(), n.KubeletPID(), p)
		if err := os.WriteFile(filepath.Join(r.wrappers, p), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

func (r *nodeRuntime) FindInPath(plugin string, _ []string) (string, error) {
	return invoke.FindInPath(plugin, []string{r.wrappers})
}

// TestDelTwiceAndCheckThroughInstalledConflist drives ADD, CHECK and DEL
// through libcni with the conflist `sluice install` wrote on the node.
func TestDelTwiceAndCheckThroughInstalledConflist(t *testing.T) {
	ctx := ctxT(t)
	node := "node-1"
	rtm := newNodeRuntime(t, node)
	n, _ := shared.Node(node)
	list, err := libcni.ConfListFromFile(filepath.Join(fmt.Sprintf("/proc/%d/root", n.KubeletPID()), "/etc/cni/net.d/10-sluice.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	// The agent wires only pods it knows from the API server; this one is
	// bound to no real node, so no kubelet runs it.
	if err := shared.EnsureNamespace(ctx, "libcni"); err != nil {
		t.Fatal(err)
	}
	pod := (labtest.PodSpec{Namespace: "libcni", Name: "direct", Node: "no-such-node"}).Pod()
	if _, err := shared.Client.CoreV1().Pods("libcni").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	defer shared.Client.CoreV1().Pods("libcni").Delete(context.Background(), "direct", metav1.DeleteOptions{})
	netnsName := "cnitest"
	if _, err := shared.Exec(node, "ip", "netns", "add", netnsName); err != nil {
		t.Fatal(err)
	}
	defer shared.Exec(node, "ip", "netns", "delete", netnsName)
	cniCfg := libcni.NewCNIConfigWithCacheDir([]string{rtm.wrappers}, t.TempDir(), rtm)
	rt := &libcni.RuntimeConf{ContainerID: "libcni-test", NetNS: "/run/netns/" + netnsName, IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "libcni"}, {"K8S_POD_NAME", "direct"}}}
	res, err := cniCfg.AddNetworkList(ctx, list, rt)
	if err != nil {
		t.Fatal(err)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil || len(r.IPs) == 0 {
		t.Fatalf("result %v %v", r, err)
	}
	ip := r.IPs[0].Address.IP.String()
	if err := cniCfg.CheckNetworkList(ctx, list, rt); err != nil {
		t.Errorf("CHECK of a fresh pod: %v", err)
	}
	if _, err := shared.Exec(node, "ip", "route", "del", ip+"/32"); err != nil {
		t.Fatal(err)
	}
	err = cniCfg.CheckNetworkList(ctx, list, rt)
	if err == nil || !strings.Contains(err.Error(), "host route to "+ip) {
		t.Errorf("CHECK after deleting the pod's route: %v", err)
	}
	if err := cniCfg.DelNetworkList(ctx, list, rt); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if err := cniCfg.DelNetworkList(context.Background(), list, rt); err != nil {
		t.Errorf("second DEL: %v", err)
	}
	if _, err := shared.Exec(node, "test", "-e", "/var/lib/cni/networks/sluice/"+ip); err == nil {
		t.Errorf("IP %s still reserved after DEL", ip)
	}
	if out, _ := shared.Exec(node, "ip", "-o", "link"); strings.Contains(out, cniVethOf("libcni", "direct")) {
		t.Error("veth left after DEL")
	}
}
