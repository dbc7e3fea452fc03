// Package wireguarde2e proves the wireguard backend in a real lab cluster
// with the userspace implementation (this machine's kernel has no
// WireGuard): pods on three nodes reach each other over TCP and UDP, IPv4
// and IPv6; nothing but WireGuard's UDP crosses the underlay; the agent
// reports its implementation; and an agent restart keeps TCP connections.
package wireguarde2e

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/internal/status"
	"github.com/sluice-net/sluice/test/labtest"
)

const netConf = `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"wireguard"}}`

var (
	shared *labtest.Lab
	agents *labtest.Agents
	// pods: one per node.
	pods = []string{"wg/a", "wg/b", "wg/c"}
)

func TestMain(m *testing.M) {
	labtest.Main(m, lab.Options{Nodes: 3, IPv6: true, CNI: lab.CNIReference}, &shared, labtest.AgentsWithPods(netConf, pods, &agents))
}

func TestPodToPodAcrossNodes(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, from := range pods {
			for _, to := range pods {
				if _, err := shared.ProbeEventually(from, to, 80, false, v6, 10*time.Second); err != nil {
					t.Fatalf("%s -> %s ipv6=%v: %v", from, to, v6, err)
				}
			}
		}
		for _, from := range pods {
			for _, to := range pods {
				for _, udp := range []bool{false, true} {
					got, err := shared.Probe(from, to, 81, udp, v6)
					if err != nil || got != to {
						t.Errorf("%s -> %s:81 udp=%v ipv6=%v: got %q, %v", from, to, udp, v6, got, err)
					}
				}
			}
		}
	}
}

// Encryption is real: see labtest.AssertEncryptedOnTheUnderlay, whose
// control is a marker sent in the clear.
func TestEncryptedOnTheUnderlay(t *testing.T) {
	labtest.AssertEncryptedOnTheUnderlay(t, shared, pods[0], pods[1], 81)
}

func TestStatusAndMetricsShowImplementation(t *testing.T) {
	var r status.Report
	if err := json.Unmarshal([]byte(shared.AgentGet(t, "node-1", "/status")), &r); err != nil {
		t.Fatal(err)
	}
	if r.Overlay.Backend != "wireguard" || r.Overlay.Implementation != "userspace" || !strings.Contains(r.Overlay.ImplementationWhy, "kernel has no WireGuard") {
		t.Errorf("status: backend %q implementation %q (%s)", r.Overlay.Backend, r.Overlay.Implementation, r.Overlay.ImplementationWhy)
	}
	if r.Overlay.MTU != 1500-80 {
		t.Errorf("dual-stack WireGuard MTU %d, want %d", r.Overlay.MTU, 1500-80)
	}
	keys := 0
	for _, p := range r.Overlay.Peers {
		if p.PublicKey != "" && p.Problem == "" {
			keys++
		}
	}
	if keys != 4 { // two peers, two families
		t.Errorf("peers with keys: %d, want 4: %+v", keys, r.Overlay.Peers)
	}
	if m := shared.AgentGet(t, "node-1", "/metrics"); !strings.Contains(m, `sluice_overlay_backend_info{backend="wireguard",implementation="userspace"} 1`) {
		t.Error("metrics lack sluice_overlay_backend_info for wireguard userspace")
	}
}

// An agent restart in userspace mode: the TUN device outlives the agent
// with its routes, the new agent reattaches and reconfigures it with the
// same key, and an established TCP connection goes on.
func TestAgentRestartKeepsTCPConnection(t *testing.T) {
	send := shared.EchoConn(t, pods[0], pods[1], 8100, 15*time.Second)
	if err := send("before"); err != nil {
		t.Fatal(err)
	}
	before := shared.AgentStatus(t, "node-1").Overlay.PublicKey
	agents.Kill("node-1")
	start := time.Now()
	if err := agents.Start("node-1"); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := agents.WaitReady(ctx, "node-1"); err != nil {
		t.Fatal(err)
	}
	if err := send("after"); err != nil {
		t.Errorf("TCP connection across the agent restart: %v", err)
	}
	t.Logf("restart to echo answered: %v", time.Since(start))
	if after := shared.AgentStatus(t, "node-1").Overlay.PublicKey; after != before {
		t.Errorf("the restart changed the key: %s -> %s", before, after)
	}
}

// The kernel implementation's dataplane is tested only where the kernel
// has WireGuard.
func TestKernelImplementation(t *testing.T) {
	out, err := shared.Exec("node-1", "ip", "link", "add", "wgprobe-e2e", "type", "wireguard")
	if err != nil {
		t.Skipf("kernel has no WireGuard (%s); the kernel implementation's configuration is unit-tested in overlay/wireguard", strings.TrimSpace(out))
	}
	_, _ = shared.Exec("node-1", "ip", "link", "del", "wgprobe-e2e")
	t.Skip("kernel has WireGuard, but a lab with Implementation kernel is not written yet")
}

// `sluiced --rotate-key` on a node: the running agent takes the new key,
// the peers follow, and an established connection goes on.
func TestRotateKeyCommand(t *testing.T) {
	send := shared.EchoConn(t, pods[1], pods[0], 8101, 20*time.Second)
	if err := send("before"); err != nil {
		t.Fatal(err)
	}
	before := shared.AgentStatus(t, "node-1").Overlay.PublicKey
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	out, err := shared.Exec("node-1", bins+"/sluiced", "--rotate-key")
	if err != nil || !strings.Contains(out, "new WireGuard public key") {
		t.Fatalf("sluiced --rotate-key: %v %s", err, out)
	}
	start := time.Now()
	if !labtest.Eventually(30*time.Second, func() bool {
		now := shared.AgentStatus(t, "node-1").Overlay.PublicKey
		if now == before {
			return false
		}
		for _, p := range shared.AgentStatus(t, "node-2").Overlay.Peers {
			if p.Node == "node-1" && p.PublicKey == now {
				return true
			}
		}
		return false
	}) {
		t.Fatal("node-2 did not follow node-1's new key")
	}
	if err := send("after"); err != nil {
		t.Errorf("TCP connection across the rotation: %v", err)
	}
	t.Logf("rotate-key to the echo answered: %v", time.Since(start))
}
