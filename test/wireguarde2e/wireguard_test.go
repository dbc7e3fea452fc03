// Package wireguarde2e proves the wireguard backend in a real lab cluster
// with the userspace implementation (this machine's kernel has no
// WireGuard): pods on three nodes reach each other over TCP and UDP, IPv4
// and IPv6; nothing but WireGuard's UDP crosses the underlay; the agent
// reports its implementation; and an agent restart keeps TCP connections.
package wireguarde2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/internal/nettest"
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

// sendMarker sends one UDP datagram holding marker from a place to an
// address and waits for the answer (every lab responder answers one).
func sendMarker(t *testing.T, from, ip, marker string) {
	t.Helper()
	sendMarkerTo(t, from, net.JoinHostPort(ip, "81"), marker)
}

func sendMarkerTo(t *testing.T, from, addr, marker string) {
	t.Helper()
	place, err := shared.Resolve(from)
	if err != nil {
		t.Fatal(err)
	}
	err = ns.WithNetNSPath(place.NetNSPath, func(ns.NetNS) error {
		c, err := net.DialTimeout("udp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Write([]byte(marker + "\n")); err != nil {
			return err
		}
		_, err = c.Read(make([]byte, 2048))
		return err
	})
	if err != nil {
		t.Fatalf("%s -> %s: %v", from, addr, err)
	}
}

// Encryption is real: while a pod sends a marker to a pod on another node,
// the underlay carries only UDP to WireGuard's ports and not the marker.
// The control: the same marker sent node to node outside the overlay is
// seen, so the capture can tell.
func TestEncryptedOnTheUnderlay(t *testing.T) {
	underlay, err := ns.GetNS("/run/netns/" + shared.UnderlayNS)
	if err != nil {
		t.Fatal(err)
	}
	defer underlay.Close()
	for _, v6 := range []bool{false, true} {
		capture := nettest.StartCapture(t, underlay, "node1")
		marker := fmt.Sprintf("sluice-secret-%d-%v", time.Now().UnixNano(), v6)
		ip, err := shared.ResolveTarget(pods[1], v6)
		if err != nil {
			t.Fatal(err)
		}
		sendMarker(t, pods[0], ip, marker)
		capture.Stop()
		if capture.Contains([]byte(marker)) {
			t.Errorf("ipv6=%v: the marker crossed the underlay in the clear", v6)
		}
		wg := 0
		for _, f := range capture.IPFlows() {
			switch {
			case f.Proto == unix.IPPROTO_UDP && (f.DstPort == 51820 || f.DstPort == 51821):
				wg++
			case f.Proto == unix.IPPROTO_UDP || f.Proto == unix.IPPROTO_TCP:
				// The agents' API traffic crosses the underlay too; pod
				// traffic would be to port 81.
				if f.DstPort == 81 || f.SrcPort == 81 {
					t.Errorf("ipv6=%v: pod traffic in the clear on the underlay: %+v", v6, f)
				}
			}
		}
		if wg == 0 {
			t.Errorf("ipv6=%v: no WireGuard packets on the underlay", v6)
		}
	}
	// Control: node-1 to the outside world, in the clear.
	capture := nettest.StartCapture(t, underlay, "node1")
	marker := fmt.Sprintf("sluice-plain-%d", time.Now().UnixNano())
	sendMarkerTo(t, "node-1", net.JoinHostPort(shared.ExternalIP4, fmt.Sprint(lab.ExternalPort)), marker)
	capture.Stop()
	if !capture.Contains([]byte(marker)) {
		t.Error("control: a marker sent outside the overlay was not seen, so the capture proves nothing")
	}
}

// agentGet fetches a path of node's agent (its health address on the
// node's loopback).
func agentGet(t *testing.T, node, path string) string {
	t.Helper()
	place, err := shared.Resolve(node)
	if err != nil {
		t.Fatal(err)
	}
	var body []byte
	// The connection is made here, in the node's namespace: net/http
	// would dial from another thread, in another namespace.
	err = ns.WithNetNSPath(place.NetNSPath, func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", "127.0.0.1:9098", 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := fmt.Fprintf(c, "GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n", path); err != nil {
			return err
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		body, err = io.ReadAll(resp.Body)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return string(body)
}

func TestStatusAndMetricsShowImplementation(t *testing.T) {
	var r status.Report
	if err := json.Unmarshal([]byte(agentGet(t, "node-1", "/status")), &r); err != nil {
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
	if m := agentGet(t, "node-1", "/metrics"); !strings.Contains(m, `sluice_overlay_backend_info{backend="wireguard",implementation="userspace"} 1`) {
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
	before := agentStatus(t, "node-1").Overlay.PublicKey
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
	if after := agentStatus(t, "node-1").Overlay.PublicKey; after != before {
		t.Errorf("the restart changed the key: %s -> %s", before, after)
	}
}

func agentStatus(t *testing.T, node string) status.Report {
	var r status.Report
	if err := json.Unmarshal([]byte(agentGet(t, node, "/status")), &r); err != nil {
		t.Fatal(err)
	}
	return r
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
	before := agentStatus(t, "node-1").Overlay.PublicKey
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
		now := agentStatus(t, "node-1").Overlay.PublicKey
		if now == before {
			return false
		}
		for _, p := range agentStatus(t, "node-2").Overlay.Peers {
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
