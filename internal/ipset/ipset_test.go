package ipset

import (
	"io"
	"log"
	"os/exec"
	"strings"
	"testing"

	"github.com/sluice-net/sluice/internal/nettest"
)

func entries(t *testing.T, ss ...string) []Entry {
	var out []Entry
	for _, s := range ss {
		e, err := ParseEntry(s)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, e)
	}
	return out
}

// listed is what ipset(8) shows, the ground truth read back from the kernel.
func listed(t *testing.T, ns, name string) string {
	out, err := exec.Command("ip", "netns", "exec", ns, "ipset", "list", name).CombinedOutput()
	if err != nil {
		t.Fatalf("ipset list %s: %v %s", name, err, out)
	}
	return string(out)
}

func TestSyncWithNomatchAndPorts(t *testing.T) {
	n := nettest.NewNS(t)
	name := nettest.Name(n)
	nettest.Do(t, n, func() error {
		c, err := Sync("SLUICE-C4-test", "hash:net", false, entries(t, "10.244.0.0/16", "10.244.5.0/24 nomatch", "192.0.2.7/32"))
		if err != nil || c != 3 {
			t.Fatalf("first sync: %d changes, %v", c, err)
		}
		if _, err := Sync("SLUICE-N6-test", "hash:ip,port", true, entries(t, "fd00::5,tcp:80", "fd00::6,udp:81")); err != nil {
			return err
		}
		return nil
	})
	out := listed(t, name, "SLUICE-C4-test")
	for _, want := range []string{"10.244.0.0/16", "10.244.5.0/24 nomatch", "192.0.2.7"} {
		if !strings.Contains(out, want) {
			t.Errorf("set lacks %q:\n%s", want, out)
		}
	}
	out = listed(t, name, "SLUICE-N6-test")
	if !strings.Contains(out, "fd00::5,tcp:80") || !strings.Contains(out, "fd00::6,udp:81") || !strings.Contains(out, "family inet6") {
		t.Errorf("hash:ip,port set:\n%s", out)
	}
	// The nomatch entry really excludes: ipset test says so.
	if err := exec.Command("ip", "netns", "exec", name, "ipset", "test", "SLUICE-C4-test", "10.244.5.9").Run(); err == nil {
		t.Error("10.244.5.9 matches despite the nomatch entry")
	}
	if err := exec.Command("ip", "netns", "exec", name, "ipset", "test", "SLUICE-C4-test", "10.244.6.9").Run(); err != nil {
		t.Error("10.244.6.9 does not match 10.244.0.0/16")
	}
	nettest.Do(t, n, func() error {
		// Same content: nothing to do.
		if c, err := Sync("SLUICE-C4-test", "hash:net", false, entries(t, "10.244.0.0/16", "10.244.5.0/24 nomatch", "192.0.2.7/32")); err != nil || c != 0 {
			t.Errorf("unchanged sync: %d changes, %v", c, err)
		}
		// One removed, one added.
		if c, err := Sync("SLUICE-C4-test", "hash:net", false, entries(t, "10.244.0.0/16", "10.244.5.0/24 nomatch", "192.0.2.8/32")); err != nil || c != 2 {
			t.Errorf("changed sync: %d changes, %v", c, err)
		}
		names, err := Names("SLUICE-")
		if err != nil || len(names) != 2 {
			t.Errorf("names %v %v", names, err)
		}
		for _, s := range names {
			if err := Destroy(s); err != nil {
				return err
			}
		}
		if err := Destroy("SLUICE-C4-test"); err != nil {
			t.Errorf("destroying a missing set: %v", err)
		}
		return nil
	})
	if out, _ := exec.Command("ip", "netns", "exec", name, "ipset", "list", "-n").CombinedOutput(); strings.TrimSpace(string(out)) != "" {
		t.Errorf("sets left: %s", out)
	}
}

func TestParseEntry(t *testing.T) {
	for _, s := range []string{"10.0.0.0/8", "10.1.0.0/16 nomatch", "10.1.2.3,tcp:80", "fd00::1,sctp:9", "fd00::/64"} {
		e, err := ParseEntry(s)
		if err != nil {
			t.Errorf("%s: %v", s, err)
			continue
		}
		if e.String() != s {
			t.Errorf("%s round-trips as %s", s, e)
		}
	}
	for _, s := range []string{"", "10.0.0.1,icmp:1", "10.0.0.1,tcp", "nope"} {
		if _, err := ParseEntry(s); err == nil {
			t.Errorf("%q accepted", s)
		}
	}
}

func init() {
	// vishvananda/netlink logs every attribute it does not decode (the
	// nomatch flag) through the standard logger.
	log.SetOutput(io.Discard)
}

// hash:ip holds single addresses, as the overlay's known-node sets use it.
func TestSyncHashIP(t *testing.T) {
	n := nettest.NewNS(t)
	for _, v6 := range []bool{false, true} {
		set, want := "SLUICE-T4-hash-ip", entries(t, "192.0.2.1/32", "192.0.2.2/32")
		if v6 {
			set, want = "SLUICE-T6-hash-ip", entries(t, "2001:db8::1/128", "2001:db8::2/128")
		}
		nettest.Do(t, n, func() error {
			if c, err := Sync(set, "hash:ip", v6, want); err != nil || c != 2 {
				t.Errorf("%s first sync: %d changes, %v", set, c, err)
			}
			if c, err := Sync(set, "hash:ip", v6, want[:1]); err != nil || c != 1 {
				t.Errorf("%s shrink: %d changes, %v", set, c, err)
			}
			if c, err := Sync(set, "hash:ip", v6, want[:1]); err != nil || c != 0 {
				t.Errorf("%s again: %d changes, %v", set, c, err)
			}
			return nil
		})
		out := listed(t, nettest.Name(n), set)
		first, second := want[0].Prefix.Addr().String(), want[1].Prefix.Addr().String()
		if !strings.Contains(out, "Type: hash:ip") || !strings.Contains(out, first+"\n") || strings.Contains(out, second+"\n") {
			t.Errorf("%s:\n%s", set, out)
		}
	}
}
