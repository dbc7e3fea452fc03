package calicoe2e

import (
	"math/rand"
	"net"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
)

// icmpArrives sends one ICMP message of a type from a pod to another and
// reports whether it reached the destination pod's namespace (a raw
// socket there sees every ICMP packet that is delivered).
func icmpArrives(t *testing.T, from, to string, typ ipv4.ICMPType) bool {
	t.Helper()
	src, err := shared.Resolve(from)
	must(t, err)
	dst, err := shared.Resolve(to)
	must(t, err)
	dstIP, err := shared.ResolveTarget(to, false)
	must(t, err)
	var listener *icmp.PacketConn
	must(t, ns.WithNetNSPath(dst.NetNSPath, func(ns.NetNS) error {
		var err error
		listener, err = icmp.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	}))
	defer listener.Close()
	id := rand.Intn(0xffff)
	var body icmp.MessageBody = &icmp.Echo{ID: id, Seq: 1, Data: []byte("sluice")}
	if typ == ipv4.ICMPTypeTimestamp {
		// Identifier, sequence, three timestamps.
		body = &icmp.RawBody{Data: append([]byte{byte(id >> 8), byte(id), 0, 1}, make([]byte, 12)...)}
	}
	msg, err := (&icmp.Message{Type: typ, Body: body}).Marshal(nil)
	must(t, err)
	must(t, ns.WithNetNSPath(src.NetNSPath, func(ns.NetNS) error {
		c, err := icmp.ListenPacket("ip4:icmp", "0.0.0.0")
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.WriteTo(msg, &net.IPAddr{IP: net.ParseIP(dstIP)})
		return err
	}))
	buf := make([]byte, 1500)
	_ = listener.SetReadDeadline(time.Now().Add(time.Second))
	for {
		n, _, err := listener.ReadFrom(buf)
		if err != nil {
			return false
		}
		m, err := icmp.ParseMessage(1, buf[:n])
		if err != nil || m.Type != typ {
			continue
		}
		switch b := m.Body.(type) {
		case *icmp.Echo:
			if b.ID == id {
				return true
			}
		case *icmp.RawBody:
			if len(b.Data) >= 2 && int(b.Data[0])<<8|int(b.Data[1]) == id {
				return true
			}
		}
	}
}

// TestICMPTypeMatching: with only echo requests allowed in, a ping
// arrives and a timestamp request does not; without the policy both do
// (the control).
func TestICMPTypeMatching(t *testing.T) {
	if !icmpArrives(t, "x/b", "x/a", ipv4.ICMPTypeTimestamp) || !icmpArrives(t, "x/b", "x/a", ipv4.ICMPTypeEcho) {
		t.Fatal("control: ICMP does not arrive without a policy")
	}
	kubectlApply(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: ping-only}
spec:
  selector: pod == 'a'
  ingress: [{action: Allow, protocol: ICMP, icmp: {type: 8}}]
`)
	deadline := time.Now().Add(30 * time.Second)
	for icmpArrives(t, "x/b", "x/a", ipv4.ICMPTypeTimestamp) {
		if time.Now().After(deadline) {
			t.Fatal("a timestamp request still arrives")
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !icmpArrives(t, "x/b", "x/a", ipv4.ICMPTypeEcho) {
		t.Error("a ping no longer arrives")
	}
}
