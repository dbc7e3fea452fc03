package calicoe2e

import (
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/policy"
)

// nflog is a listener on one NFLOG group in a network namespace, spoken
// to over nfnetlink_log directly: enough to see the records' prefixes.
type nflog struct{ c *netlink.Conn }

const (
	nfnlSubsysULOG   = 4
	nfulnlMsgPacket  = 0
	nfulnlMsgConfig  = 1
	nfulaCfgCmd      = 1
	nfulaCfgMode     = 2
	nfulaPrefix      = 10
	nfulnlCmdBind    = 1
	nfulnlCopyPacket = 2
)

func listenNFLOG(netnsPath string, group uint16) (*nflog, error) {
	var c *netlink.Conn
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		var err error
		c, err = netlink.Dial(unix.NETLINK_NETFILTER, nil)
		return err
	})
	if err != nil {
		return nil, err
	}
	config := func(attr uint16, value []byte) error {
		ae := netlink.NewAttributeEncoder()
		ae.Bytes(attr, value)
		attrs, err := ae.Encode()
		if err != nil {
			return err
		}
		hdr := []byte{unix.AF_UNSPEC, 0, 0, 0}
		binary.BigEndian.PutUint16(hdr[2:], group)
		_, err = c.Execute(netlink.Message{
			Header: netlink.Header{Type: netlink.HeaderType(nfnlSubsysULOG<<8 | nfulnlMsgConfig), Flags: netlink.Request | netlink.Acknowledge},
			Data:   append(hdr, attrs...),
		})
		return err
	}
	mode := make([]byte, 6)
	binary.BigEndian.PutUint32(mode, 0xffff)
	mode[4] = nfulnlCopyPacket
	if err := config(nfulaCfgCmd, []byte{nfulnlCmdBind}); err != nil {
		c.Close()
		return nil, fmt.Errorf("binding NFLOG group %d: %w", group, err)
	}
	if err := config(nfulaCfgMode, mode); err != nil {
		c.Close()
		return nil, fmt.Errorf("setting the copy mode: %w", err)
	}
	return &nflog{c}, nil
}

// prefixes returns the prefixes of the records that arrive within d.
func (n *nflog) prefixes(d time.Duration) []string {
	var out []string
	_ = n.c.SetReadDeadline(time.Now().Add(d))
	for {
		msgs, err := n.c.Receive()
		if err != nil {
			return out
		}
		for _, m := range msgs {
			if m.Header.Type != netlink.HeaderType(nfnlSubsysULOG<<8|nfulnlMsgPacket) || len(m.Data) < 4 {
				continue
			}
			ad, err := netlink.NewAttributeDecoder(m.Data[4:])
			if err != nil {
				continue
			}
			for ad.Next() {
				if ad.Type() == nfulaPrefix {
					out = append(out, strings.TrimRight(string(ad.Bytes()), "\x00"))
				}
			}
		}
	}
}

// TestLogWritesAnNFLOGRecord: a Log rule writes a record with the
// policy's prefix to NFLOG group 20 on the receiving node, and lets the
// next rule decide; traffic the Log rule does not match writes none (the
// control).
func TestLogWritesAnNFLOGRecord(t *testing.T) {
	node, err := shared.Resolve("node-1") // x/a's node
	must(t, err)
	l, err := listenNFLOG(node.NetNSPath, policy.DefaultLogGroup)
	must(t, err)
	defer l.c.Close()
	kubectlApply(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: log-then-allow}
spec:
  selector: pod == 'a'
  ingress: [{action: Log, protocol: TCP}, {action: Allow}]
`)
	want := policy.LogPrefix(policy.CalicoNetworkPolicyKey+"x/log-then-allow", false, 0)
	var got []string
	deadline := time.Now().Add(30 * time.Second)
	for !containsPrefix(got, want) && time.Now().Before(deadline) {
		if !reaches("x/b", "x/a") {
			t.Fatal("the Log rule stopped the connection")
		}
		got = append(got, l.prefixes(500*time.Millisecond)...)
	}
	if !containsPrefix(got, want) {
		t.Fatalf("no NFLOG record with prefix %q (got %v)", want, got)
	}
	// UDP is not logged.
	place, _ := shared.Resolve("x/b")
	ip, _ := shared.ResolveTarget("x/a", false)
	l.prefixes(200 * time.Millisecond) // drain the TCP records
	if _, err := lab.Probe(place, ip, 80, true, 700*time.Millisecond); err != nil {
		t.Errorf("UDP to x/a: %v", err)
	}
	if extra := l.prefixes(time.Second); containsPrefix(extra, want) {
		t.Errorf("UDP was logged: %v", extra)
	}
}

func containsPrefix(list []string, p string) bool {
	for _, s := range list {
		if s == p {
			return true
		}
	}
	return false
}
