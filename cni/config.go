// Package cni is the sluice CNI plugin. For each pod sandbox it creates a
// veth pair, gets addresses from the delegated IPAM plugin (host-local by
// default, on the node's subnet from the overlay loop), routes the pod
// through the host as Calico does, and registers the endpoint with the
// local sluiced before it returns, so a pod never runs unprotected.
package cni

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/sluice-net/sluice/cni/endpointapi"
)

// Defaults.
const (
	DefaultSubnetFile = "/run/sluice/subnet.env"
	DefaultDataDir    = "/var/lib/cni/sluice"
	usePodCIDR        = "usePodCidr"
	usePodCIDRIPv6    = "usePodCidrIPv6"
)

func withSubnet(r map[string]any, p netip.Prefix) map[string]any {
	cp := map[string]any{}
	for k, v := range r {
		cp[k] = v
	}
	cp["subnet"] = p.String()
	return cp
}

// NetConf is the plugin's network configuration.
type NetConf struct {
	types.NetConf
	// MTU overrides the overlay's MTU; leave it out.
	MTU int `json:"mtu,omitempty"`
	// SubnetFile is where the overlay loop publishes the node's subnets.
	SubnetFile string `json:"subnetFile,omitempty"`
	// AgentSocket is the sluiced endpoint socket.
	AgentSocket string `json:"agentSocket,omitempty"`
	// AgentTimeout bounds the wait for the endpoint to be programmed, as a
	// Go duration ("10s").
	AgentTimeout string `json:"agentTimeout,omitempty"`
	// DataDir keeps, per attachment, the IPAM configuration ADD used.
	DataDir string `json:"dataDir,omitempty"`
	// ValidAttachments is set by the runtime for GC.
	ValidAttachments []types.GCAttachment `json:"cni.dev/valid-attachments,omitempty"`

	raw     map[string]any
	timeout time.Duration
}

// ParseConf reads and validates the plugin's stdin. It never panics on
// malformed input.
func ParseConf(stdin []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(stdin, &conf.raw); err != nil || conf.raw == nil {
		msg := "not valid JSON"
		if err == nil {
			msg = "null"
		}
		return nil, types.NewError(types.ErrDecodingFailure, "sluice: the network configuration is not valid JSON object", msg)
	}
	if ipam, ok := conf.raw["ipam"]; ok && ipam != nil {
		if _, ok := ipam.(map[string]any); !ok {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, `sluice: "ipam" must be an object such as {"type": "host-local", "subnet": "usePodCidr"}`, "")
		}
	}
	if err := json.Unmarshal(stdin, conf); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "sluice: a field of the network configuration has the wrong type", err.Error())
	}
	if conf.SubnetFile == "" {
		conf.SubnetFile = DefaultSubnetFile
	}
	if conf.DataDir == "" {
		conf.DataDir = DefaultDataDir
	}
	if conf.AgentSocket == "" {
		conf.AgentSocket = endpointapi.DefaultSocket
	}
	conf.timeout = endpointapi.Timeout
	if conf.AgentTimeout != "" {
		d, err := time.ParseDuration(conf.AgentTimeout)
		if err != nil || d <= 0 || d > 10*time.Minute {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(`sluice: "agentTimeout" is %q; use a duration such as "10s"`, conf.AgentTimeout), "")
		}
		conf.timeout = d
	}
	if conf.MTU != 0 && (conf.MTU < 576 || conf.MTU > 65535) {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(`sluice: "mtu" is %d; leave it out to use the overlay's MTU`, conf.MTU), "")
	}
	if m, ok := conf.raw["ipam"].(map[string]any); ok {
		if t, ok := m["type"]; ok {
			if s, ok := t.(string); !ok || s == "" || strings.ContainsAny(s, "/\\") {
				return nil, types.NewError(types.ErrInvalidNetworkConfig, `sluice: "ipam.type" must name an IPAM plugin in the CNI bin dir, such as "host-local"`, "")
			}
		}
	}
	return conf, nil
}

// Subnets is what the overlay loop publishes in subnet.env.
type Subnets struct {
	Network, Subnet   netip.Prefix
	Network6, Subnet6 netip.Prefix
	MTU               int
	IPMasq            bool
}

// List returns the node's subnets, IPv4 first.
func (s *Subnets) List() []netip.Prefix {
	var ps []netip.Prefix
	if s.Subnet.IsValid() {
		ps = append(ps, s.Subnet)
	}
	if s.Subnet6.IsValid() {
		ps = append(ps, s.Subnet6)
	}
	return ps
}

// ReadSubnets parses subnet.env. A missing file means the agent has not
// started yet, which the runtime should retry.
func ReadSubnets(path string) (*Subnets, error) {
	f, err := os.Open(path)
	if os.IsNotExist(err) {
		return nil, types.NewError(types.ErrTryAgainLater, fmt.Sprintf("sluice: %s does not exist yet: sluiced has not set up this node's overlay (is the sluice DaemonSet running here?)", path), "")
	}
	if err != nil {
		return nil, types.NewError(types.ErrIOFailure, "sluice: reading "+path, err.Error())
	}
	defer f.Close()
	s := &Subnets{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), "=")
		if !ok {
			continue
		}
		var perr error
		switch k {
		case "SLUICE_NETWORK":
			s.Network, perr = netip.ParsePrefix(v)
		case "SLUICE_SUBNET":
			s.Subnet, perr = netip.ParsePrefix(v)
		case "SLUICE_IPV6_NETWORK":
			s.Network6, perr = netip.ParsePrefix(v)
		case "SLUICE_IPV6_SUBNET":
			s.Subnet6, perr = netip.ParsePrefix(v)
		case "SLUICE_MTU":
			s.MTU, perr = strconv.Atoi(v)
		case "SLUICE_IPMASQ":
			s.IPMasq = v == "true"
		}
		if perr != nil {
			return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("sluice: %s has a bad %s: %q", path, k, v), perr.Error())
		}
	}
	if len(s.List()) == 0 || s.MTU == 0 {
		return nil, types.NewError(types.ErrTryAgainLater, fmt.Sprintf("sluice: %s lists no subnet or MTU yet", path), "")
	}
	return s, nil
}

// ipamConf returns the delegated IPAM plugin's type and stdin: this network
// configuration with "usePodCidr" replaced by the node's subnets. Without an
// ipam section, host-local on the node's subnets is used.
func (c *NetConf) ipamConf(subnets *Subnets) (string, []byte, error) {
	raw := map[string]any{}
	for k, v := range c.raw {
		raw[k] = v
	}
	ipam, _ := raw["ipam"].(map[string]any)
	if ipam == nil {
		ipam = map[string]any{"type": "host-local", "subnet": usePodCIDR}
	} else {
		cp := map[string]any{}
		for k, v := range ipam {
			cp[k] = v
		}
		ipam = cp
	}
	typ, _ := ipam["type"].(string)
	if typ == "" {
		typ = "host-local"
		ipam["type"] = typ
	}
	// "subnet": "usePodCidr" becomes one range set per family; inside
	// "ranges", "usePodCidr" is the IPv4 subnet and "usePodCidrIPv6" the
	// IPv6 one, as in flannel's CNI plugin.
	if s, _ := ipam["subnet"].(string); s == usePodCIDR {
		delete(ipam, "subnet")
		var ranges [][]map[string]string
		for _, p := range subnets.List() {
			ranges = append(ranges, []map[string]string{{"subnet": p.String()}})
		}
		ipam["ranges"] = ranges
	} else if rs, ok := ipam["ranges"].([]any); ok {
		var out []any
		for _, set := range rs {
			items, ok := set.([]any)
			if !ok {
				return "", nil, types.NewError(types.ErrInvalidNetworkConfig, `sluice: "ipam.ranges" must be a list of lists of ranges`, "")
			}
			var outSet []any
			for _, it := range items {
				r, ok := it.(map[string]any)
				if !ok {
					return "", nil, types.NewError(types.ErrInvalidNetworkConfig, `sluice: each entry of "ipam.ranges" must be an object`, "")
				}
				switch r["subnet"] {
				case usePodCIDR:
					p := subnets.Subnet
					if !p.IsValid() {
						p = subnets.Subnet6
					}
					outSet = append(outSet, withSubnet(r, p))
					continue
				case usePodCIDRIPv6:
					if !subnets.Subnet6.IsValid() {
						return "", nil, types.NewError(types.ErrInvalidNetworkConfig, `sluice: "usePodCidrIPv6" is used, but the overlay has no IPv6 subnet (EnableIPv6 in net-conf.json)`, "")
					}
					outSet = append(outSet, withSubnet(r, subnets.Subnet6))
					continue
				}
				outSet = append(outSet, r)
			}
			out = append(out, outSet)
		}
		ipam["ranges"] = out
	}
	raw["ipam"] = ipam
	b, err := json.Marshal(raw)
	if err != nil {
		return "", nil, err
	}
	return typ, b, nil
}
