package contract

import "testing"

func TestCheckTunnelDevice(t *testing.T) {
	for _, name := range []string{"vx-sluice.1", "vx6-sluice.1", "wg-sluice"} {
		if err := CheckTunnelDevice(name); err != nil {
			t.Errorf("CheckTunnelDevice(%q) = %v, want nil", name, err)
		}
	}
	for _, name := range []string{"sl0123456789a", "sluice0"} {
		if CheckTunnelDevice(name) == nil {
			t.Errorf("CheckTunnelDevice(%q) accepted a name the policy loop takes for a pod veth", name)
		}
	}
}

func TestMustTunnelPrefixPanics(t *testing.T) {
	defer func() {
		if recover() == nil {
			t.Error(`MustTunnelPrefix("sl-tun") did not panic`)
		}
	}()
	MustTunnelPrefix("sl-tun")
}
