package cni_test

import (
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/sluice-net/sluice/cni"
	"github.com/sluice-net/sluice/internal/nettest"
)

// TestDelOfOldSandboxKeepsTheCurrentOne: a runtime replaces a pod's
// sandbox, then retries the DEL of the old one (containerd does). Both
// sandboxes of the pod get the same host veth name, so without an owner
// check that DEL would delete the current sandbox's veth, and the pod
// would lose its network.
func TestDelOfOldSandboxKeepsTheCurrentOne(t *testing.T) {
	h := newHost(t)
	list := h.conflist("1.0.0")
	sandbox := func(id, netns string) *libcni.RuntimeConf {
		return &libcni.RuntimeConf{ContainerID: id, NetNS: netns, IfName: "eth0", Args: [][2]string{
			{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "test"}, {"K8S_POD_NAME", "web"}, {"K8S_POD_INFRA_CONTAINER_ID", id}}}
	}
	// The control: both sandboxes really compete for one name.
	if cni.HostVethName("test", "web", "old") != cni.HostVethName("test", "web", "cur") {
		t.Fatal("sandboxes of one pod have different veth names; this test would prove nothing")
	}
	oldNS, curNS := nettest.NewNS(t), nettest.NewNS(t)
	old, cur := sandbox("old", oldNS.Path()), sandbox("cur", curNS.Path())
	if _, err := h.add(list, old); err != nil {
		t.Fatal(err)
	}
	res, err := h.add(list, cur)
	if err != nil {
		t.Fatalf("ADD of the new sandbox: %v", err)
	}
	veth := cni.HostVethName("test", "web", "cur")
	if out := nettest.Run(t, "ip", "-n", nettest.Name(h.netns), "link", "show", veth); !strings.Contains(out, "alias sluice:cur") {
		t.Errorf("host veth does not record its owner:\n%s", out)
	}

	if err := h.del(list, old); err != nil {
		t.Fatalf("DEL of the old sandbox: %v", err)
	}
	if links := h.slLinks(); len(links) != 1 {
		t.Fatalf("host veths after the old sandbox's DEL: %v, want the current one", links)
	}
	for _, ipc := range res.IPs {
		if err := connect(t, h.netns, curNS, ipc.Address.IP.String()); err != nil {
			t.Errorf("host -> current sandbox %s after the old one's DEL: %v", ipc.Address.IP, err)
		}
	}
	if err := h.check(list, cur); err != nil {
		t.Errorf("CHECK of the current sandbox after the old one's DEL: %v", err)
	}
	eps := h.registry.List()
	if len(eps) != 1 || eps[0].ContainerID != "cur" {
		t.Errorf("agent endpoints after the old sandbox's DEL: %+v, want only cur's", eps)
	}
	// host-local keeps the current sandbox's two IPs and released the old's.
	if left := h.reservations(); len(left) != 2 {
		t.Errorf("reserved IPs: %v, want the current sandbox's two", left)
	}

	if err := h.del(list, cur); err != nil {
		t.Fatal(err)
	}
	if left := h.slLinks(); len(left) != 0 {
		t.Errorf("veths left after the current sandbox's DEL: %v", left)
	}
	if left := h.reservations(); len(left) != 0 {
		t.Errorf("IPs left reserved: %v", left)
	}
}
