package netconf

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// Backend types.
const (
	BackendVXLAN     = "vxlan"
	BackendHostGW    = "host-gw"
	BackendWireGuard = "wireguard"
)

// WireGuard modes, as flannel's: "separate" runs one tunnel per address
// family, "auto" one tunnel that carries both.
const (
	WireGuardModeSeparate = "separate"
	WireGuardModeAuto     = "auto"
)

// WireGuard implementations, Sluice's own field: "kernel" needs the
// wireguard module, "userspace" runs golang.zx2c4.com/wireguard over a TUN
// device inside the agent, and "auto" picks the kernel's when the module
// can make a wireguard link.
const (
	WireGuardAuto      = "auto"
	WireGuardKernel    = "kernel"
	WireGuardUserspace = "userspace"
)

// Defaults, as in flannel.
const (
	DefaultVNI            = 1
	DefaultPort           = 8472
	DefaultSubnetLen      = 24
	DefaultIPv6SubnetLen  = 64
	DefaultWGListenPort   = 51820
	DefaultWGListenPortV6 = 51821
	maxVNI                = 1<<24 - 1
)

// Config is a validated net-conf.json with defaults applied.
type Config struct {
	EnableIPv4    bool
	EnableIPv6    bool
	Network       netip.Prefix // valid when EnableIPv4
	IPv6Network   netip.Prefix // valid when EnableIPv6
	SubnetLen     int
	IPv6SubnetLen int
	Backend       Backend
}

// Backend is the "Backend" section.
type Backend struct {
	Type string
	VNI  int
	Port int
	// MTU of the tunnel device; 0 derives it from the underlay.
	MTU           int
	DirectRouting bool
	GBP           bool
	// WireGuard holds the wireguard backend's fields; zero for the others.
	WireGuard WireGuard
}

// WireGuard is the wireguard backend's part of "Backend", flannel's fields
// plus Implementation.
type WireGuard struct {
	// PSK is an optional base64 pre-shared key, the same on every node,
	// mixed into every handshake.
	PSK          string
	ListenPort   int
	ListenPortV6 int
	// PersistentKeepaliveInterval is in seconds; 0 disables keepalives.
	PersistentKeepaliveInterval int
	Mode                        string
	Implementation              string
}

// raw mirrors the JSON; pointers tell "absent" from "zero".
type raw struct {
	Network       string `json:"Network"`
	IPv6Network   string `json:"IPv6Network"`
	EnableIPv4    *bool  `json:"EnableIPv4"`
	EnableIPv6    *bool  `json:"EnableIPv6"`
	SubnetLen     int    `json:"SubnetLen"`
	IPv6SubnetLen int    `json:"IPv6SubnetLen"`
	Backend       *struct {
		Type          string `json:"Type"`
		VNI           int    `json:"VNI"`
		Port          int    `json:"Port"`
		MTU           int    `json:"MTU"`
		DirectRouting bool   `json:"DirectRouting"`
		GBP           bool   `json:"GBP"`
		// The wireguard backend's fields.
		PSK                         string `json:"PSK"`
		ListenPort                  int    `json:"ListenPort"`
		ListenPortV6                int    `json:"ListenPortV6"`
		PersistentKeepaliveInterval int    `json:"PersistentKeepaliveInterval"`
		Mode                        string `json:"Mode"`
		Implementation              string `json:"Implementation"`
	} `json:"Backend"`
}

// FieldError names the field that is wrong and how to fix it.
type FieldError struct {
	Field string
	Value any
	Why   string
	Fix   string
}

func (e *FieldError) Error() string {
	msg := fmt.Sprintf("net-conf.json: %q", e.Field)
	if e.Value != nil {
		msg += fmt.Sprintf(" is %v", jsonValue(e.Value))
	}
	msg += ": " + e.Why
	if e.Fix != "" {
		msg += "; " + e.Fix
	}
	return msg
}

func jsonValue(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return fmt.Sprint(v)
	}
	return string(b)
}

// Parse reads and validates net-conf.json. Every error names the field and
// says how to fix it.
func Parse(data []byte) (*Config, error) {
	var r raw
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&r); err != nil {
		var syn *json.SyntaxError
		var typ *json.UnmarshalTypeError
		switch {
		case errors.As(err, &syn):
			return nil, fmt.Errorf("net-conf.json is not valid JSON (at byte %d): %v", syn.Offset, err)
		case errors.As(err, &typ):
			return nil, &FieldError{Field: typ.Field, Why: fmt.Sprintf("must be a %s, not a JSON %s", typ.Type, typ.Value), Fix: "see the README's net-conf.json reference"}
		default:
			return nil, fmt.Errorf("net-conf.json is not valid JSON: %v", err)
		}
	}
	if dec.More() {
		return nil, errors.New("net-conf.json has data after its closing brace")
	}
	c := &Config{
		SubnetLen:     r.SubnetLen,
		IPv6SubnetLen: r.IPv6SubnetLen,
		Backend:       Backend{Type: BackendVXLAN, VNI: DefaultVNI, Port: DefaultPort},
	}
	// As in flannel, IPv4 is on unless switched off, and IPv6 is off unless
	// switched on.
	c.EnableIPv4 = r.EnableIPv4 == nil || *r.EnableIPv4
	c.EnableIPv6 = r.EnableIPv6 != nil && *r.EnableIPv6
	if !c.EnableIPv4 && !c.EnableIPv6 {
		return nil, &FieldError{Field: "EnableIPv4", Value: false, Why: "and EnableIPv6 is not true, so no address family is enabled", Fix: "enable at least one family"}
	}
	if c.EnableIPv4 {
		p, err := parseNetwork("Network", r.Network, false, `set it to the cluster's pod network, e.g. "10.244.0.0/16" (kubeadm's --pod-network-cidr)`)
		if err != nil {
			return nil, err
		}
		c.Network = p
		if c.SubnetLen == 0 {
			c.SubnetLen = DefaultSubnetLen
			if c.Network.Bits() >= DefaultSubnetLen {
				// A small network still gets room for several nodes, as
				// flannel does.
				c.SubnetLen = c.Network.Bits() + 4
			}
		}
		if c.SubnetLen <= c.Network.Bits() || c.SubnetLen > 30 {
			return nil, &FieldError{Field: "SubnetLen", Value: c.SubnetLen, Why: fmt.Sprintf("must be longer than the Network's /%d and at most 30", c.Network.Bits()), Fix: "use 24 for a /16 Network"}
		}
	}
	if c.EnableIPv6 {
		p, err := parseNetwork("IPv6Network", r.IPv6Network, true, `set it to the cluster's IPv6 pod network, e.g. "fd00:10:244::/56", or set "EnableIPv6": false`)
		if err != nil {
			return nil, err
		}
		c.IPv6Network = p
		if c.IPv6SubnetLen == 0 {
			c.IPv6SubnetLen = DefaultIPv6SubnetLen
		}
		if c.IPv6SubnetLen <= c.IPv6Network.Bits() || c.IPv6SubnetLen > 126 {
			return nil, &FieldError{Field: "IPv6SubnetLen", Value: c.IPv6SubnetLen, Why: fmt.Sprintf("must be longer than the IPv6Network's /%d and at most 126", c.IPv6Network.Bits()), Fix: "use 64 for a /56 IPv6Network"}
		}
	}
	if b := r.Backend; b != nil {
		if b.Type != "" {
			c.Backend.Type = strings.ToLower(b.Type)
		}
		if b.VNI != 0 {
			c.Backend.VNI = b.VNI
		}
		if b.Port != 0 {
			c.Backend.Port = b.Port
		}
		c.Backend.MTU, c.Backend.DirectRouting, c.Backend.GBP = b.MTU, b.DirectRouting, b.GBP
		if c.Backend.Type == BackendWireGuard {
			c.Backend.WireGuard = WireGuard{PSK: b.PSK, ListenPort: b.ListenPort, ListenPortV6: b.ListenPortV6,
				PersistentKeepaliveInterval: b.PersistentKeepaliveInterval, Mode: strings.ToLower(b.Mode), Implementation: strings.ToLower(b.Implementation)}
		} else if b.PSK != "" || b.ListenPort != 0 || b.ListenPortV6 != 0 || b.PersistentKeepaliveInterval != 0 || b.Mode != "" || b.Implementation != "" {
			return nil, &FieldError{Field: "Backend.Type", Value: c.Backend.Type, Why: "does not take the wireguard fields (PSK, ListenPort, ListenPortV6, PersistentKeepaliveInterval, Mode, Implementation)",
				Fix: `set "Type": "wireguard" or remove them`}
		}
	}
	if c.Backend.Type == BackendWireGuard {
		c.Backend.WireGuard.applyDefaults()
	}
	if err := c.validateBackend(); err != nil {
		return nil, err
	}
	return c, nil
}

func parseNetwork(field, s string, ipv6 bool, fix string) (netip.Prefix, error) {
	if s == "" {
		return netip.Prefix{}, &FieldError{Field: field, Why: "is missing", Fix: fix}
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, &FieldError{Field: field, Value: s, Why: "is not a CIDR", Fix: fix}
	}
	if p.Addr().Is4() == ipv6 || p.Addr().Is4In6() {
		fam := "an IPv4"
		if ipv6 {
			fam = "an IPv6"
		}
		return netip.Prefix{}, &FieldError{Field: field, Value: s, Why: "must be " + fam + " CIDR", Fix: fix}
	}
	if p.Masked() != p {
		return netip.Prefix{}, &FieldError{Field: field, Value: s, Why: "has host bits set", Fix: fmt.Sprintf("did you mean %q?", p.Masked().String())}
	}
	return p, nil
}

func (c *Config) validateBackend() error {
	b := c.Backend
	switch b.Type {
	case BackendVXLAN, BackendHostGW:
	case BackendWireGuard:
		return c.validateWireGuard()
	case "ipip", "udp", "ipsec", "alivpc", "gce", "awsvpc", "tencentvpc", "alloc":
		return &FieldError{Field: "Backend.Type", Value: b.Type, Why: "is a flannel backend Sluice does not support", Fix: `use "vxlan", "wireguard" for encryption, or "host-gw" when all nodes share one L2 network`}
	default:
		return &FieldError{Field: "Backend.Type", Value: b.Type, Why: "is not a backend", Fix: `use "vxlan", "wireguard" or "host-gw"`}
	}
	if err := c.validateMTU(); err != nil {
		return err
	}
	if b.VNI < 1 || b.VNI > maxVNI {
		return &FieldError{Field: "Backend.VNI", Value: b.VNI, Why: fmt.Sprintf("must be between 1 and %d", maxVNI), Fix: "flannel's default is 1"}
	}
	if b.Port < 1 || b.Port > 65535 {
		return &FieldError{Field: "Backend.Port", Value: b.Port, Why: "must be a UDP port (1-65535)", Fix: "flannel's default is 8472; the IANA VXLAN port is 4789"}
	}
	if b.Type == BackendHostGW && b.DirectRouting {
		return &FieldError{Field: "Backend.DirectRouting", Value: true, Why: "only applies to the vxlan backend", Fix: "host-gw always routes directly; remove the field"}
	}
	return nil
}

func (c *Config) validateMTU() error {
	b := c.Backend
	minMTU := 576
	if c.EnableIPv6 {
		minMTU = 1280
	}
	if b.MTU != 0 && (b.MTU < minMTU || b.MTU > 65535) {
		return &FieldError{Field: "Backend.MTU", Value: b.MTU, Why: fmt.Sprintf("must be between %d and 65535", minMTU), Fix: "leave it out to derive it from the underlay interface"}
	}
	return nil
}

func (w *WireGuard) applyDefaults() {
	if w.ListenPort == 0 {
		w.ListenPort = DefaultWGListenPort
	}
	if w.ListenPortV6 == 0 {
		w.ListenPortV6 = DefaultWGListenPortV6
	}
	if w.Mode == "" {
		w.Mode = WireGuardModeSeparate
	}
	if w.Implementation == "" {
		w.Implementation = WireGuardAuto
	}
}

// validateWireGuard checks the wireguard backend's fields.
func (c *Config) validateWireGuard() error {
	if err := c.validateMTU(); err != nil {
		return err
	}
	w := c.Backend.WireGuard
	if c.Backend.DirectRouting || c.Backend.GBP {
		return &FieldError{Field: "Backend.DirectRouting", Value: c.Backend.DirectRouting, Why: "and GBP only apply to the vxlan backend", Fix: "the wireguard backend always encrypts; remove the field"}
	}
	if w.PSK != "" {
		if k, err := base64.StdEncoding.DecodeString(w.PSK); err != nil || len(k) != 32 {
			return &FieldError{Field: "Backend.PSK", Value: "(hidden)", Why: "must be 32 bytes in base64", Fix: "make one with 'wg genpsk' or 'head -c 32 /dev/urandom | base64'"}
		}
	}
	for _, p := range []struct {
		field string
		port  int
	}{{"Backend.ListenPort", w.ListenPort}, {"Backend.ListenPortV6", w.ListenPortV6}} {
		if p.port < 1 || p.port > 65535 {
			return &FieldError{Field: p.field, Value: p.port, Why: "must be a UDP port (1-65535)", Fix: "the defaults are 51820 (IPv4) and 51821 (IPv6)"}
		}
	}
	if w.Mode == WireGuardModeSeparate && c.EnableIPv4 && c.EnableIPv6 && w.ListenPort == w.ListenPortV6 {
		return &FieldError{Field: "Backend.ListenPortV6", Value: w.ListenPortV6, Why: "equals ListenPort, but Mode separate runs one tunnel per family, each on its own port", Fix: `use another port, or "Mode": "auto" for one tunnel`}
	}
	if w.PersistentKeepaliveInterval < 0 || w.PersistentKeepaliveInterval > 65535 {
		return &FieldError{Field: "Backend.PersistentKeepaliveInterval", Value: w.PersistentKeepaliveInterval, Why: "must be between 0 (off) and 65535 seconds", Fix: "25 keeps NAT mappings open; leave it out inside a data centre"}
	}
	switch w.Mode {
	case WireGuardModeSeparate, WireGuardModeAuto:
	default:
		return &FieldError{Field: "Backend.Mode", Value: w.Mode, Why: "is not a wireguard mode", Fix: `use "separate" (one tunnel per family) or "auto" (one tunnel for both)`}
	}
	switch w.Implementation {
	case WireGuardAuto, WireGuardKernel, WireGuardUserspace:
	default:
		return &FieldError{Field: "Backend.Implementation", Value: w.Implementation, Why: "is not a wireguard implementation", Fix: `use "auto" (the kernel module when present), "kernel" or "userspace"`}
	}
	return nil
}

// Networks lists the enabled cluster networks.
func (c *Config) Networks() []netip.Prefix {
	var ps []netip.Prefix
	if c.EnableIPv4 {
		ps = append(ps, c.Network)
	}
	if c.EnableIPv6 {
		ps = append(ps, c.IPv6Network)
	}
	return ps
}

// SubnetLenFor returns the per-node subnet length of a family.
func (c *Config) SubnetLenFor(ipv6 bool) int {
	if ipv6 {
		return c.IPv6SubnetLen
	}
	return c.SubnetLen
}
