package labtest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/internal/nettest"
	"github.com/sluice-net/sluice/internal/status"
)

// AgentGet fetches a path of a node's agent from its health address on the
// node's loopback (127.0.0.1:9098), where both the lab's agent processes
// and the DaemonSet's hostNetwork containers listen.
func (l *Lab) AgentGet(t testing.TB, node, path string) string {
	t.Helper()
	place, err := l.Resolve(node)
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
		t.Fatalf("agent on %s, GET %s: %v", node, path, err)
	}
	return string(body)
}

// AgentStatus is a node's agent's /status report.
func (l *Lab) AgentStatus(t testing.TB, node string) status.Report {
	t.Helper()
	var r status.Report
	if err := json.Unmarshal([]byte(l.AgentGet(t, node, "/status")), &r); err != nil {
		t.Fatalf("agent on %s: /status: %v", node, err)
	}
	return r
}

// SendUDP sends one datagram holding msg from a place to an address and
// waits for the answer (every lab responder, and agnhost porter, answers
// one).
func (l *Lab) SendUDP(t testing.TB, from, addr, msg string) {
	t.Helper()
	place, err := l.Resolve(from)
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
		if _, err := c.Write([]byte(msg + "\n")); err != nil {
			return err
		}
		_, err = c.Read(make([]byte, 2048))
		return err
	})
	if err != nil {
		t.Fatalf("%s -> %s: %v", from, addr, err)
	}
}

// AssertEncryptedOnTheUnderlay proves that the overlay encrypts: while pod
// from sends a marker to pod to on another node's UDP port, a capture of
// node-1's underlay port sees only UDP to WireGuard's ports, and the
// marker nowhere. The control: a marker node-1 sends to the outside world
// in the clear is seen, so the capture can tell.
func AssertEncryptedOnTheUnderlay(t *testing.T, l *Lab, from, to string, port int) {
	t.Helper()
	underlay, err := ns.GetNS("/run/netns/" + l.UnderlayNS)
	if err != nil {
		t.Fatal(err)
	}
	defer underlay.Close()
	for _, v6 := range []bool{false, true} {
		capture := nettest.StartCapture(t, underlay, "node1")
		marker := fmt.Sprintf("sluice-secret-%d-%v", time.Now().UnixNano(), v6)
		ip, err := l.ResolveTarget(to, v6)
		if err != nil {
			t.Fatal(err)
		}
		l.SendUDP(t, from, net.JoinHostPort(ip, fmt.Sprint(port)), marker)
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
				// traffic would be to the pod's port.
				if int(f.DstPort) == port || int(f.SrcPort) == port {
					t.Errorf("ipv6=%v: pod traffic in the clear on the underlay: %+v", v6, f)
				}
			}
		}
		if wg == 0 {
			t.Errorf("ipv6=%v: no WireGuard packets on the underlay", v6)
		}
	}
	capture := nettest.StartCapture(t, underlay, "node1")
	marker := fmt.Sprintf("sluice-plain-%d", time.Now().UnixNano())
	l.SendUDP(t, "node-1", net.JoinHostPort(l.ExternalIP4, fmt.Sprint(lab.ExternalPort)), marker)
	capture.Stop()
	if !capture.Contains([]byte(marker)) {
		t.Error("control: a marker sent outside the overlay was not seen, so the capture proves nothing")
	}
}
