package netconf

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// Backend types.
const (
	BackendVXLAN  = "vxlan"
	BackendHostGW = "host-gw"
)

// Defaults, as in flannel.
const (
	DefaultVNI           = 1
	DefaultPort          = 8472
	DefaultSubnetLen     = 24
	DefaultIPv6SubnetLen = 64
	maxVNI               = 1<<24 - 1
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
	case "wireguard", "ipip", "udp", "ipsec", "alivpc", "gce", "awsvpc", "tencentvpc", "alloc":
		return &FieldError{Field: "Backend.Type", Value: b.Type, Why: "is a flannel backend Sluice does not support", Fix: `use "vxlan" (or "host-gw" when all nodes share one L2 network)`}
	default:
		return &FieldError{Field: "Backend.Type", Value: b.Type, Why: "is not a backend", Fix: `use "vxlan" or "host-gw"`}
	}
	if b.VNI < 1 || b.VNI > maxVNI {
		return &FieldError{Field: "Backend.VNI", Value: b.VNI, Why: fmt.Sprintf("must be between 1 and %d", maxVNI), Fix: "flannel's default is 1"}
	}
	if b.Port < 1 || b.Port > 65535 {
		return &FieldError{Field: "Backend.Port", Value: b.Port, Why: "must be a UDP port (1-65535)", Fix: "flannel's default is 8472; the IANA VXLAN port is 4789"}
	}
	minMTU := 576
	if c.EnableIPv6 {
		minMTU = 1280
	}
	if b.MTU != 0 && (b.MTU < minMTU || b.MTU > 65535) {
		return &FieldError{Field: "Backend.MTU", Value: b.MTU, Why: fmt.Sprintf("must be between %d and 65535", minMTU), Fix: "leave it out to derive it from the underlay interface"}
	}
	if b.Type == BackendHostGW && b.DirectRouting {
		return &FieldError{Field: "Backend.DirectRouting", Value: true, Why: "only applies to the vxlan backend", Fix: "host-gw always routes directly; remove the field"}
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
