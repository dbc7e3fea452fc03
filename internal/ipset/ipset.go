package ipset

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Entry is a set member: a prefix (hash:net), possibly excluded (nomatch),
// or an address with a protocol and port (hash:ip,port).
type Entry struct {
	Prefix  netip.Prefix
	NoMatch bool
	Proto   uint8 // with Port, for hash:ip,port
	Port    uint16
}

// String is the entry in ipset(8)'s notation.
func (e Entry) String() string {
	if e.Port != 0 {
		return fmt.Sprintf("%s,%s:%d", e.Prefix.Addr(), protoName(e.Proto), e.Port)
	}
	s := e.Prefix.String()
	if e.NoMatch {
		s += " nomatch"
	}
	return s
}

func protoName(p uint8) string {
	switch p {
	case unix.IPPROTO_TCP:
		return "tcp"
	case unix.IPPROTO_UDP:
		return "udp"
	case unix.IPPROTO_SCTP:
		return "sctp"
	}
	return strconv.Itoa(int(p))
}

// ParseEntry reads "10.0.0.0/8", "10.1.0.0/16 nomatch" or "10.1.2.3,tcp:80".
func ParseEntry(s string) (Entry, error) {
	if ip, pp, ok := strings.Cut(s, ","); ok {
		addr, err := netip.ParseAddr(ip)
		if err != nil {
			return Entry{}, fmt.Errorf("entry %q: %w", s, err)
		}
		proto, port, ok := strings.Cut(pp, ":")
		n, err := strconv.Atoi(port)
		if !ok || err != nil || n < 0 || n > 65535 {
			return Entry{}, fmt.Errorf("entry %q: bad protocol:port", s)
		}
		e := Entry{Prefix: netip.PrefixFrom(addr, addr.BitLen()), Port: uint16(n)}
		switch proto {
		case "tcp":
			e.Proto = unix.IPPROTO_TCP
		case "udp":
			e.Proto = unix.IPPROTO_UDP
		case "sctp":
			e.Proto = unix.IPPROTO_SCTP
		default:
			return Entry{}, fmt.Errorf("entry %q: unknown protocol %q", s, proto)
		}
		return e, nil
	}
	cidr, nomatch := strings.CutSuffix(s, " nomatch")
	p, err := netip.ParsePrefix(cidr)
	if err != nil {
		return Entry{}, fmt.Errorf("entry %q: %w", s, err)
	}
	return Entry{Prefix: p.Masked(), NoMatch: nomatch}, nil
}

func family(ipv6 bool) uint8 {
	if ipv6 {
		return unix.AF_INET6
	}
	return unix.AF_INET
}

// Ensure creates a set of that type and family, or recreates one of the
// same name with another type or family.
func Ensure(name, typ string, ipv6 bool) (created bool, err error) {
	_, created, err = ensure(name, typ, ipv6)
	return created, err
}

// ensure is Ensure that also returns the set's listing, members included,
// when it was there: Sync diffs against it instead of listing again.
func ensure(name, typ string, ipv6 bool) (*netlink.IPSetResult, bool, error) {
	cur, err := netlink.IpsetList(name)
	if err == nil {
		if cur.TypeName == typ && cur.Family == family(ipv6) {
			return cur, false, nil
		}
		if err := netlink.IpsetDestroy(name); err != nil {
			return nil, false, fmt.Errorf("ipset %s has type %s, want %s, and cannot be replaced: %w", name, cur.TypeName, typ, err)
		}
	}
	opts := netlink.IpsetCreateOptions{Family: family(ipv6)}
	if typ == "hash:net" {
		// Revision 2 added the nomatch flag; the library's default is 0.
		opts.Revision = 2
	}
	if err := netlink.IpsetCreate(name, typ, opts); err != nil {
		return nil, false, fmt.Errorf("creating ipset %s (%s): %w", name, typ, err)
	}
	return nil, true, nil
}

// Destroy removes a set; a missing one is not an error.
func Destroy(name string) error {
	err := netlink.IpsetDestroy(name)
	if err != nil && !isNotExist(err) {
		return fmt.Errorf("destroying ipset %s: %w", name, err)
	}
	return nil
}

func isNotExist(err error) bool {
	var errno syscall.Errno
	if errors.As(err, &errno) && errno == syscall.ENOENT {
		return true
	}
	return strings.Contains(err.Error(), "does not exist") || errors.Is(err, nl.IPSetError(nl.IPSET_ERR_PROTOCOL))
}

// Names lists the sets whose names start with prefix.
func Names(prefix string) ([]string, error) {
	all, err := netlink.IpsetListAll()
	if err != nil {
		return nil, fmt.Errorf("listing ipsets: %w", err)
	}
	var names []string
	for _, s := range all {
		if strings.HasPrefix(s.SetName, prefix) {
			names = append(names, s.SetName)
		}
	}
	sort.Strings(names)
	return names, nil
}

// Members lists a set's entries. The netlink library drops the nomatch
// flag when it decodes a dump, so members are compared by prefix and port.
func Members(name string) ([]Entry, error) {
	res, err := netlink.IpsetList(name)
	if err != nil {
		return nil, fmt.Errorf("listing ipset %s: %w", name, err)
	}
	return entriesOf(res), nil
}

func entriesOf(res *netlink.IPSetResult) []Entry {
	var out []Entry
	for _, e := range res.Entries {
		a, ok := netip.AddrFromSlice(e.IP)
		if !ok {
			continue
		}
		a = a.Unmap()
		bits := a.BitLen()
		if e.CIDR != 0 {
			bits = int(e.CIDR)
		}
		en := Entry{Prefix: netip.PrefixFrom(a, bits)}
		if e.Port != nil {
			en.Port = *e.Port
			if e.Protocol != nil {
				en.Proto = *e.Protocol
			}
		}
		out = append(out, en)
	}
	return out
}

// Key identifies an entry regardless of its nomatch flag.
func (e Entry) Key() string {
	e.NoMatch = false
	return e.String()
}

// Add adds an entry; Del deletes one (a missing one is not an error).
func Add(name string, e Entry) error { return addDel(nl.IPSET_CMD_ADD, name, e) }

// Del deletes an entry.
func Del(name string, e Entry) error {
	err := addDel(nl.IPSET_CMD_DEL, name, e)
	if err != nil && errors.Is(err, nl.IPSetError(nl.IPSET_ERR_EXIST)) {
		return nil
	}
	return err
}

func addDel(cmd int, name string, e Entry) error {
	req := nl.NewNetlinkRequest(cmd|(unix.NFNL_SUBSYS_IPSET<<8), nl.GetIpsetFlags(cmd))
	req.AddData(&nl.Nfgenmsg{NfgenFamily: uint8(unix.AF_NETLINK), Version: nl.NFNETLINK_V0})
	req.AddData(nl.NewRtAttr(nl.IPSET_ATTR_PROTOCOL, nl.Uint8Attr(nl.IPSET_PROTOCOL)))
	req.AddData(nl.NewRtAttr(nl.IPSET_ATTR_SETNAME, nl.ZeroTerminated(name)))
	// Re-adding an existing entry is not an error: NLM_F_EXCL stays off.
	data := nl.NewRtAttr(nl.IPSET_ATTR_DATA|int(nl.NLA_F_NESTED), nil)
	addr := e.Prefix.Addr()
	ipType := nl.IPSET_ATTR_IPADDR_IPV4
	if addr.Is6() {
		ipType = nl.IPSET_ATTR_IPADDR_IPV6
	}
	ip := nl.NewRtAttr(nl.IPSET_ATTR_IP|int(nl.NLA_F_NESTED), nil)
	ip.AddChild(nl.NewRtAttr(ipType|int(nl.NLA_F_NET_BYTEORDER), addr.AsSlice()))
	data.AddChild(ip)
	if e.Port != 0 {
		data.AddChild(nl.NewRtAttr(nl.IPSET_ATTR_PROTO, nl.Uint8Attr(e.Proto)))
		buf := make([]byte, 2)
		binary.BigEndian.PutUint16(buf, e.Port)
		data.AddChild(nl.NewRtAttr(int(nl.IPSET_ATTR_PORT|nl.NLA_F_NET_BYTEORDER), buf))
	} else if e.Prefix.Bits() != addr.BitLen() {
		data.AddChild(nl.NewRtAttr(nl.IPSET_ATTR_CIDR, nl.Uint8Attr(uint8(e.Prefix.Bits()))))
	}
	if e.NoMatch && cmd == nl.IPSET_CMD_ADD {
		data.AddChild(&nl.Uint32Attribute{Type: nl.IPSET_ATTR_CADT_FLAGS | nl.NLA_F_NET_BYTEORDER, Value: nl.IPSET_FLAG_NOMATCH})
	}
	data.AddChild(&nl.Uint32Attribute{Type: nl.IPSET_ATTR_LINENO | nl.NLA_F_NET_BYTEORDER, Value: 0})
	req.AddData(data)
	if _, err := req.Execute(unix.NETLINK_NETFILTER, 0); err != nil {
		var errno syscall.Errno
		if errors.As(err, &errno) && int(errno) >= nl.IPSET_ERR_PRIVATE {
			err = nl.IPSetError(uintptr(errno))
		}
		verb := "adding"
		if cmd == nl.IPSET_CMD_DEL {
			verb = "deleting"
		}
		return fmt.Errorf("%s %s in ipset %s: %w", verb, e, name, err)
	}
	return nil
}

// Sync makes a set hold exactly the wanted entries, writing only the
// differences, and reports how many it changed.
func Sync(name, typ string, ipv6 bool, want []Entry) (int, error) {
	// One listing serves the check of the set's type and the diff both
	// ways: at thousands of members, each listing costs more than the rest
	// of a sync.
	res, created, err := ensure(name, typ, ipv6)
	if err != nil {
		return 0, err
	}
	var cur []Entry
	have := map[string]bool{}
	if !created {
		cur = entriesOf(res)
		for _, e := range cur {
			have[e.Key()] = true
		}
	}
	wantKeys := map[string]bool{}
	changes := 0
	for _, e := range want {
		wantKeys[e.Key()] = true
		if have[e.Key()] {
			continue
		}
		if err := Add(name, e); err != nil {
			return changes, err
		}
		changes++
	}
	if !created {
		for _, e := range cur {
			if wantKeys[e.Key()] {
				continue
			}
			if err := Del(name, e); err != nil {
				return changes, err
			}
			changes++
		}
	}
	return changes, nil
}

// ErrNotExist says a set does not exist (any more).
var ErrNotExist = errors.New("no such ipset")

// Content returns a set's type and its entries' keys (Entry.Key: the
// nomatch flag, which dumps lose, is not part of it), sorted. A set that
// is gone is ErrNotExist: a reader beside the writer may list a set the
// writer destroys next.
func Content(name string) (string, []string, error) {
	res, err := netlink.IpsetList(name)
	if err != nil {
		if isNotExist(err) {
			return "", nil, fmt.Errorf("ipset %s: %w", name, ErrNotExist)
		}
		return "", nil, fmt.Errorf("listing ipset %s: %w", name, err)
	}
	members, err := Members(name)
	if err != nil {
		if isNotExist(err) {
			return "", nil, fmt.Errorf("ipset %s: %w", name, ErrNotExist)
		}
		return "", nil, err
	}
	keys := make([]string, 0, len(members))
	for _, e := range members {
		keys = append(keys, e.Key())
	}
	sort.Strings(keys)
	return res.TypeName, keys, nil
}
