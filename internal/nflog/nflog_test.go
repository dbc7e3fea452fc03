package nflog

import (
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/nettest"
)

// A packet an NFLOG rule logs in a fresh namespace arrives with its
// prefix, addresses and ports; the control: a packet the rule does not
// match arrives not at all.
func TestReadsLoggedPackets(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for network namespaces")
	}
	n := nettest.NewNS(t)
	var r *Reader
	nettest.Do(t, n, func() error {
		nettest.Run(t, "ip", "link", "set", "lo", "up")
		nettest.Run(t, "iptables", "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "NFLOG", "--nflog-group", "30", "--nflog-prefix", "sluice|test")
		var err error
		if r, err = Open(30); err != nil {
			return err
		}
		for _, port := range []string{"10", "9"} { // 10 is not logged
			c, err := net.Dial("udp", "127.0.0.1:"+port)
			if err != nil {
				return err
			}
			_, _ = c.Write([]byte("x"))
			c.Close()
		}
		return nil
	})
	defer r.Close()
	got := make(chan []Record, 1)
	go func() {
		recs, err := r.Read()
		if err != nil {
			t.Error(err)
		}
		got <- recs
	}()
	select {
	case recs := <-got:
		if len(recs) != 1 {
			t.Fatalf("records %+v, want one", recs)
		}
		rec := recs[0]
		if rec.Prefix != "sluice|test" || rec.Dst != netip.MustParseAddr("127.0.0.1") || rec.DstPort != 9 || rec.Proto != 17 {
			t.Errorf("record %+v", rec)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no record within 5 s")
	}
}
