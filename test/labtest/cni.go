package labtest

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/version"
)

// NodeRuntime lets the test process act as a node's container runtime:
// libcni runs here, and each plugin it calls runs in the node's mount and
// network namespaces through a small wrapper, as it would under the
// node's runtime.
type NodeRuntime struct {
	*invoke.RawExec
	version.PluginDecoder
	wrappers string
	kubelet  int
}

// NewNodeRuntime returns a runtime for a node of the lab.
func (l *Lab) NewNodeRuntime(t *testing.T, node string) *NodeRuntime {
	n, ok := l.Node(node)
	if !ok {
		t.Fatalf("no node %s", node)
	}
	r := &NodeRuntime{RawExec: &invoke.RawExec{Stderr: os.Stderr}, wrappers: t.TempDir(), kubelet: n.KubeletPID()}
	for _, p := range []string{"sluice", "host-local", "portmap", "bandwidth", "loopback"} {
		script := fmt.Sprintf("#!/bin/sh\nexec nsenter --mount=/proc/%d/ns/mnt --net=/proc/%d/ns/net -- /opt/cni/bin/%s \"$@\"\n", r.kubelet, r.kubelet, p)
		if err := os.WriteFile(filepath.Join(r.wrappers, p), []byte(script), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return r
}

// FindInPath finds a plugin's wrapper.
func (r *NodeRuntime) FindInPath(plugin string, _ []string) (string, error) {
	return invoke.FindInPath(plugin, []string{r.wrappers})
}

// Config returns libcni with this runtime, and the conflist `sluice
// install` wrote on the node.
func (r *NodeRuntime) Config(t *testing.T) (*libcni.CNIConfig, *libcni.NetworkConfigList) {
	list, err := libcni.ConfListFromFile(filepath.Join(fmt.Sprintf("/proc/%d/root", r.kubelet), "/etc/cni/net.d/10-sluice.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	return libcni.NewCNIConfigWithCacheDir([]string{r.wrappers}, t.TempDir(), r), list
}
