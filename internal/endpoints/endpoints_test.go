package endpoints

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/sluice-net/sluice/cni/endpointapi"
	"github.com/sluice-net/sluice/internal/nettest"
)

// recorder is a Programmer that remembers what it was told.
type recorder struct{ programmed, removed []string }

func (r *recorder) ProgramEndpoint(_ context.Context, ep endpointapi.Endpoint) error {
	r.programmed = append(r.programmed, ep.Key())
	return nil
}

func (r *recorder) RemoveEndpoint(_ context.Context, ep endpointapi.Endpoint) error {
	r.removed = append(r.removed, ep.Key())
	return nil
}

// TestForgetVanished: an endpoint whose host veth is gone (its DEL never
// reached the agent) is unregistered, with its record and its dataplane;
// one whose veth is there stays.
func TestForgetVanished(t *testing.T) {
	n := nettest.NewNS(t)
	dir := t.TempDir()
	prog := &recorder{}
	nettest.Do(t, n, func() error {
		for _, name := range []string{"sl0000000000a", "sl0000000000b"} {
			veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
			if err := netlink.LinkAdd(veth); err != nil {
				return err
			}
		}
		r, err := NewRegistry(dir, nil, prog)
		if err != nil {
			return err
		}
		ctx := context.Background()
		gone := endpointapi.Endpoint{ContainerID: "c1", IfName: "eth0", Namespace: "x", Pod: "gone", HostVeth: "sl0000000000a", IPs: []string{"10.244.0.2"}}
		kept := endpointapi.Endpoint{ContainerID: "c2", IfName: "eth0", Namespace: "x", Pod: "kept", HostVeth: "sl0000000000b", IPs: []string{"10.244.0.3"}}
		for _, ep := range []endpointapi.Endpoint{gone, kept} {
			if err := r.Register(ctx, ep); err != nil {
				return err
			}
		}
		if n, err := r.ForgetVanished(ctx); err != nil || n != 0 {
			t.Errorf("with every veth present, forgot %d (%v)", n, err)
		}
		link, err := netlink.LinkByName("sl0000000000a")
		if err != nil {
			return err
		}
		if err := netlink.LinkDel(link); err != nil {
			return err
		}
		if n, err := r.ForgetVanished(ctx); err != nil || n != 1 {
			t.Errorf("forgot %d endpoints (%v), want 1", n, err)
		}
		if list := r.List(); len(list) != 1 || list[0].Pod != "kept" {
			t.Errorf("endpoints left: %+v", list)
		}
		if len(prog.removed) != 1 || prog.removed[0] != gone.Key() {
			t.Errorf("the policy loop was told to remove %v", prog.removed)
		}
		if _, err := os.Stat(filepath.Join(dir, "c1_eth0.json")); !os.IsNotExist(err) {
			t.Errorf("the vanished endpoint's record remains: %v", err)
		}
		// A restarted agent does not bring it back.
		r2, err := NewRegistry(dir, nil, prog)
		if err != nil {
			return err
		}
		if list := r2.List(); len(list) != 1 {
			t.Errorf("after a restart: %+v", list)
		}
		return nil
	})
}
