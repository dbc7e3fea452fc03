package main

import (
	"testing"
	"time"

	"github.com/sluice-net/sluice/overlay"
	"github.com/sluice-net/sluice/overlay/netconf"
)

// TestResyncPeriodReachesThePolicyLoop: --resync-period configures the
// policy loop's re-read, not only the overlay's.
func TestResyncPeriodReachesThePolicyLoop(t *testing.T) {
	o := options{resync: 7 * time.Second, strictTCP: true}
	cfg := overlay.Config{NodeName: "node-1", Net: &netconf.Config{EnableIPv4: true}}
	pc := policyConfig(o, cfg, 0x10000)
	if pc.ResyncPeriod != 7*time.Second {
		t.Errorf("policy loop resync period %v, want the flag's 7s", pc.ResyncPeriod)
	}
	if pc.NodeName != "node-1" || pc.AcceptMark != 0x10000 || !pc.StrictTCPPickup {
		t.Errorf("policy config %+v does not carry the flags", pc)
	}
}
