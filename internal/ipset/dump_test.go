package ipset

import (
	"fmt"
	"os/exec"
	"strings"
	"testing"

	"github.com/sluice-net/sluice/internal/nettest"
)

// TestDumpOfManyMembers reads back sets whose dumps span many netlink
// messages, with the in-place decoder, against ipset(8)'s own listing.
func TestDumpOfManyMembers(t *testing.T) {
	n := nettest.NewNS(t)
	name := nettest.Name(n)
	var want []Entry
	for i := 0; i < 5000; i++ {
		e, _ := ParseEntry(fmt.Sprintf("10.%d.%d.%d/32", 20+i/65536, i/256%256, i%256))
		want = append(want, e)
	}
	ports, _ := ParseEntry("10.1.2.3,udp:53")
	nettest.Do(t, n, func() error {
		if c, err := Sync("SLUICE-BIG-test", "hash:net", false, want); err != nil || c != len(want) {
			t.Fatalf("sync: %d changes, %v", c, err)
		}
		if _, err := Sync("SLUICE-P-test", "hash:ip,port", false, []Entry{ports}); err != nil {
			return err
		}
		if _, err := Sync("OTHER-test", "hash:net", false, want[:3]); err != nil {
			return err
		}
		typ, keys, err := Content("SLUICE-BIG-test")
		if err != nil || typ != "hash:net" || len(keys) != len(want) {
			t.Errorf("content: %s, %d keys, %v", typ, len(keys), err)
		}
		if _, keys, err := Content("SLUICE-P-test"); err != nil || len(keys) != 1 || keys[0] != "10.1.2.3,udp:53" {
			t.Errorf("hash:ip,port content: %v %v", keys, err)
		}
		if _, _, err := Content("SLUICE-MISSING-test"); err == nil || !strings.Contains(err.Error(), ErrNotExist.Error()) {
			t.Errorf("a missing set: %v", err)
		}
		names, err := Names("SLUICE-")
		if err != nil || strings.Join(names, ",") != "SLUICE-BIG-test,SLUICE-P-test" {
			t.Errorf("names %v %v", names, err)
		}
		// Ensure reads the header only: same type and family is kept,
		// another family or type replaces the set.
		if created, err := Ensure("SLUICE-P-test", "hash:ip,port", false); err != nil || created {
			t.Errorf("ensure of an existing set: created %v, %v", created, err)
		}
		if created, err := Ensure("SLUICE-P-test", "hash:ip,port", true); err != nil || !created {
			t.Errorf("ensure with another family: created %v, %v", created, err)
		}
		if created, err := Ensure("SLUICE-P-test", "hash:net", true); err != nil || !created {
			t.Errorf("ensure with another type: created %v, %v", created, err)
		}
		// Half removed: one read, one socket, 2,500 deletions.
		if c, err := Sync("SLUICE-BIG-test", "hash:net", false, want[:2500]); err != nil || c != 2500 {
			t.Errorf("shrinking sync: %d changes, %v", c, err)
		}
		return nil
	})
	out, err := exec.Command("ip", "netns", "exec", name, "ipset", "list", "SLUICE-BIG-test").CombinedOutput()
	if err != nil {
		t.Fatal(err, string(out))
	}
	if !strings.Contains(string(out), "Number of entries: 2500") {
		t.Errorf("after shrinking, ipset(8) lists:\n%s", string(out)[:min(len(out), 400)])
	}
}
