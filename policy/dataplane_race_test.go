package policy

import (
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"

	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

// midWriteReader is a rule writer that reads the kernel just before each
// restore reaches it: the periodic re-read running beside a long write.
type midWriteReader struct {
	*iptables.Runner
	d    *Dataplane
	read []KernelState
}

func (m *midWriteReader) Restore(table string, payload []byte) error {
	if k, err := m.d.Read(); err == nil {
		m.read = append(m.read, k)
	}
	return m.Runner.Restore(table, payload)
}

// TestReadDuringWriteIsNotAdopted: a re-read that began while a write was
// under way may have seen none of it; adopting it would make the next
// Apply write every chain again (at 50,000 pods, seconds of
// iptables-restore in front of the next policy change).
func TestReadDuringWriteIsNotAdopted(t *testing.T) {
	n := nettest.NewNS(t)
	w := newWorld()
	deny := np("x", "deny", networkingv1.NetworkPolicySpec{})
	nettest.Do(t, n, func() error {
		r, err := forwardingWriter()
		if err != nil {
			return err
		}
		m := &midWriteReader{Runner: r}
		d := NewDataplane(m, false)
		m.d = d
		if _, err := d.Apply(w.render([]*Policy{deny})); err != nil {
			return err
		}
		if len(m.read) == 0 {
			t.Fatal("no read happened during the write")
		}
		if d.Adopt(m.read[len(m.read)-1]) {
			t.Error("a read that began during the write was adopted")
		}
		// Control: a read after the write is adopted, and changes nothing.
		k, err := d.Read()
		if err != nil {
			return err
		}
		if !d.Adopt(k) {
			t.Error("a read after the write was not adopted")
		}
		if st, err := d.Apply(w.render([]*Policy{deny})); err != nil || st.ChainsWritten != 0 {
			t.Errorf("apply after adopting a current read: %+v %v", st, err)
		}
		return nil
	})
}

// TestRereadPause: the re-read waits the resync period, or ten times a
// slow read, so re-reading never takes more than a tenth of a core.
func TestRereadPause(t *testing.T) {
	for _, c := range []struct{ period, took, want time.Duration }{
		{5 * time.Second, 20 * time.Millisecond, 5 * time.Second},
		{5 * time.Second, 1500 * time.Millisecond, 15 * time.Second},
	} {
		if got := rereadPause(c.period, c.took); got != c.want {
			t.Errorf("rereadPause(%s, %s) = %s, want %s", c.period, c.took, got, c.want)
		}
	}
}
