package ipset

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// This file reads set dumps from netlink without the netlink library's
// decoder: that one hands every attribute through a channel, and a dump
// of 50,000 members then costs seconds of goroutine switches (worse on
// a thread locked to a network namespace, where each switch is a futex
// wake-up of another OS thread). Here attributes are walked in place.

// The command-level flags of a list: IPSET_FLAG_LIST_SETNAME asks for
// the names only (ipset list -n), IPSET_FLAG_LIST_HEADER for the headers
// without members (ipset list -t).
const (
	listSetNameFlag = 1 << 1
	listHeaderFlag  = 1 << 2
)

// dumped is one set as a dump shows it.
type dumped struct {
	name, typ string
	family    uint8
	entries   []Entry
}

// dump lists one set, or every set when name is "". flags (listSetNameFlag,
// listHeaderFlag) ask the kernel for less than the members. A dump that a
// concurrent write interrupted is taken again, a few times.
func dump(name string, flags uint32) ([]dumped, error) {
	for try := 0; ; try++ {
		out, err := dumpOnce(name, flags)
		if !errors.Is(err, nl.ErrDumpInterrupted) || try == 2 {
			return out, err
		}
	}
}

func dumpOnce(name string, flags uint32) ([]dumped, error) {
	req := nl.NewNetlinkRequest(nl.IPSET_CMD_LIST|(unix.NFNL_SUBSYS_IPSET<<8), nl.GetIpsetFlags(nl.IPSET_CMD_LIST))
	req.AddData(&nl.Nfgenmsg{NfgenFamily: uint8(unix.AF_NETLINK), Version: nl.NFNETLINK_V0})
	req.AddData(nl.NewRtAttr(nl.IPSET_ATTR_PROTOCOL, nl.Uint8Attr(nl.IPSET_PROTOCOL)))
	if name != "" {
		req.AddData(nl.NewRtAttr(nl.IPSET_ATTR_SETNAME, nl.ZeroTerminated(name)))
	}
	if flags != 0 {
		req.AddData(&nl.Uint32Attribute{Type: nl.IPSET_ATTR_FLAGS | nl.NLA_F_NET_BYTEORDER, Value: flags})
	}
	var out []dumped
	err := req.ExecuteIter(unix.NETLINK_NETFILTER, 0, func(msg []byte) bool {
		if len(msg) < 4 {
			return true
		}
		d := dumped{}
		walkAttrs(msg[4:], func(typ uint16, v []byte) {
			switch typ &^ (nl.NLA_F_NESTED | nl.NLA_F_NET_BYTEORDER) {
			case nl.IPSET_ATTR_SETNAME:
				d.name = cString(v)
			case nl.IPSET_ATTR_TYPENAME:
				d.typ = cString(v)
			case nl.IPSET_ATTR_FAMILY:
				if len(v) > 0 {
					d.family = v[0]
				}
			case nl.IPSET_ATTR_ADT:
				walkAttrs(v, func(t uint16, e []byte) {
					if t&^nl.NLA_F_NESTED == nl.IPSET_ATTR_DATA {
						if en, ok := parseEntry(e); ok {
							d.entries = append(d.entries, en)
						}
					}
				})
			}
		})
		// A set's dump may span several messages, each naming the set.
		if n := len(out); n > 0 && out[n-1].name == d.name {
			out[n-1].entries = append(out[n-1].entries, d.entries...)
			if out[n-1].typ == "" {
				out[n-1].typ, out[n-1].family = d.typ, d.family
			}
			return true
		}
		out = append(out, d)
		return true
	})
	if err != nil {
		var errno syscall.Errno
		if errors.As(err, &errno) && int(errno) >= nl.IPSET_ERR_PRIVATE {
			err = nl.IPSetError(uintptr(errno))
		}
		return nil, err
	}
	return out, nil
}

// parseEntry reads one member's attributes: its address, CIDR, port and
// protocol. Dumps do not say nomatch reliably, so it is left out.
func parseEntry(data []byte) (Entry, bool) {
	var (
		addr        netip.Addr
		cidr, proto uint8
		port        uint16
	)
	walkAttrs(data, func(typ uint16, v []byte) {
		switch typ &^ (nl.NLA_F_NESTED | nl.NLA_F_NET_BYTEORDER) {
		case nl.IPSET_ATTR_IP:
			walkAttrs(v, func(t uint16, a []byte) {
				switch t &^ (nl.NLA_F_NESTED | nl.NLA_F_NET_BYTEORDER) {
				case nl.IPSET_ATTR_IPADDR_IPV4, nl.IPSET_ATTR_IPADDR_IPV6:
					if ip, ok := netip.AddrFromSlice(a); ok {
						addr = ip.Unmap()
					}
				}
			})
		case nl.IPSET_ATTR_CIDR:
			if len(v) > 0 {
				cidr = v[0]
			}
		case nl.IPSET_ATTR_PORT:
			if len(v) >= 2 {
				port = binary.BigEndian.Uint16(v)
			}
		case nl.IPSET_ATTR_PROTO:
			if len(v) > 0 {
				proto = v[0]
			}
		}
	})
	if !addr.IsValid() {
		return Entry{}, false
	}
	bits := addr.BitLen()
	if cidr != 0 {
		bits = int(cidr)
	}
	e := Entry{Prefix: netip.PrefixFrom(addr, bits)}
	if port != 0 {
		e.Port, e.Proto = port, proto
	}
	return e, true
}

// walkAttrs calls fn for each netlink attribute in b, in place.
func walkAttrs(b []byte, fn func(typ uint16, value []byte)) {
	for len(b) >= unix.SizeofNlAttr {
		l := int(nl.NativeEndian().Uint16(b[0:2]))
		typ := nl.NativeEndian().Uint16(b[2:4])
		if l < unix.SizeofNlAttr || l > len(b) {
			return
		}
		fn(typ, b[unix.SizeofNlAttr:l])
		next := (l + unix.NLA_ALIGNTO - 1) &^ (unix.NLA_ALIGNTO - 1)
		if next > len(b) {
			return
		}
		b = b[next:]
	}
}

func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// listOne lists one set: its type and family, and its members unless
// flags say headers only.
func listOne(name string, flags uint32) (dumped, error) {
	sets, err := dump(name, flags)
	if err != nil {
		if isNotExist(err) {
			return dumped{}, fmt.Errorf("ipset %s: %w", name, ErrNotExist)
		}
		return dumped{}, fmt.Errorf("listing ipset %s: %w", name, err)
	}
	for _, s := range sets {
		if s.name == name {
			return s, nil
		}
	}
	return dumped{}, fmt.Errorf("ipset %s: %w", name, ErrNotExist)
}
