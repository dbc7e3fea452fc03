package wireguard

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// The cross-platform configuration protocol
// (https://www.wireguard.com/xplatform/) is what a userspace WireGuard
// speaks on its UAPI socket, and what wgctrl's userspace client sends. The
// agent's own userspace device is configured with the same text through
// the device's in-process entry points, so no socket path, and no mount
// namespace, stands between the agent and the device it owns.

// encodeConfig renders a wgctrl configuration as a "set" operation's body.
func encodeConfig(cfg wgtypes.Config) string {
	var b strings.Builder
	line := func(k, v string) { b.WriteString(k + "=" + v + "\n") }
	if cfg.PrivateKey != nil {
		line("private_key", hexKey(*cfg.PrivateKey))
	}
	if cfg.ListenPort != nil {
		line("listen_port", strconv.Itoa(*cfg.ListenPort))
	}
	if cfg.FirewallMark != nil {
		line("fwmark", strconv.Itoa(*cfg.FirewallMark))
	}
	if cfg.ReplacePeers {
		line("replace_peers", "true")
	}
	for _, p := range cfg.Peers {
		line("public_key", hexKey(p.PublicKey))
		if p.Remove {
			line("remove", "true")
			continue
		}
		if p.UpdateOnly {
			line("update_only", "true")
		}
		if p.PresharedKey != nil {
			line("preshared_key", hexKey(*p.PresharedKey))
		}
		if p.Endpoint != nil {
			line("endpoint", p.Endpoint.String())
		}
		if p.PersistentKeepaliveInterval != nil {
			line("persistent_keepalive_interval", strconv.Itoa(int(*p.PersistentKeepaliveInterval/time.Second)))
		}
		if p.ReplaceAllowedIPs {
			line("replace_allowed_ips", "true")
		}
		for _, a := range p.AllowedIPs {
			line("allowed_ip", a.String())
		}
	}
	return b.String()
}

func hexKey(k wgtypes.Key) string { return hex.EncodeToString(k[:]) }

func parseHexKey(s string) (wgtypes.Key, error) {
	var k wgtypes.Key
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != len(k) {
		return k, fmt.Errorf("bad key %q", s)
	}
	copy(k[:], b)
	return k, nil
}

// parseDevice reads a "get" operation's answer into wgctrl's device type.
func parseDevice(name, text string) (*wgtypes.Device, error) {
	d := &wgtypes.Device{Name: name, Type: wgtypes.Userspace}
	var peer *wgtypes.Peer
	var sec, nsec int64
	flush := func() {
		if peer != nil {
			if sec != 0 || nsec != 0 {
				peer.LastHandshakeTime = time.Unix(sec, nsec)
			}
			d.Peers = append(d.Peers, *peer)
		}
		sec, nsec = 0, 0
	}
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), "=")
		if !ok {
			continue
		}
		if err := parseLine(d, &peer, k, v, &sec, &nsec, flush); err != nil {
			return nil, fmt.Errorf("reading WireGuard device %s: %s: %w", name, k, err)
		}
	}
	flush()
	return d, nil
}

func parseLine(d *wgtypes.Device, peer **wgtypes.Peer, k, v string, sec, nsec *int64, flush func()) error {
	var err error
	if k == "public_key" {
		flush()
		*peer = &wgtypes.Peer{}
		(*peer).PublicKey, err = parseHexKey(v)
		return err
	}
	p := *peer
	if p == nil {
		switch k {
		case "private_key":
			d.PrivateKey, err = parseHexKey(v)
			d.PublicKey = d.PrivateKey.PublicKey()
		case "listen_port":
			d.ListenPort, err = strconv.Atoi(v)
		case "fwmark":
			d.FirewallMark, err = strconv.Atoi(v)
		}
		return err
	}
	switch k {
	case "preshared_key":
		p.PresharedKey, err = parseHexKey(v)
	case "endpoint":
		var ap netip.AddrPort
		if ap, err = netip.ParseAddrPort(v); err == nil {
			p.Endpoint = net.UDPAddrFromAddrPort(ap)
		}
	case "last_handshake_time_sec":
		*sec, err = strconv.ParseInt(v, 10, 64)
	case "last_handshake_time_nsec":
		*nsec, err = strconv.ParseInt(v, 10, 64)
	case "tx_bytes":
		p.TransmitBytes, err = strconv.ParseInt(v, 10, 64)
	case "rx_bytes":
		p.ReceiveBytes, err = strconv.ParseInt(v, 10, 64)
	case "persistent_keepalive_interval":
		var n int
		n, err = strconv.Atoi(v)
		p.PersistentKeepaliveInterval = time.Duration(n) * time.Second
	case "allowed_ip":
		var pr netip.Prefix
		if pr, err = netip.ParsePrefix(v); err == nil {
			p.AllowedIPs = append(p.AllowedIPs, net.IPNet{IP: pr.Addr().AsSlice(), Mask: net.CIDRMask(pr.Bits(), pr.Addr().BitLen())})
		}
	case "protocol_version":
		p.ProtocolVersion, err = strconv.Atoi(v)
	}
	return err
}
