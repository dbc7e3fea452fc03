// Package nflog reads packets an iptables NFLOG target sends to one group,
// over nfnetlink_log, with the raw netlink protocol
// (include/uapi/linux/netfilter/nfnetlink_log.h): bind the group, ask for
// the first bytes of each packet, and decode the prefix, the interfaces
// and the IP and transport headers of each record.
package nflog

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The protocol's numbers, from nfnetlink.h and nfnetlink_log.h.
const (
	subsysULOG    = 4
	msgPacket     = 0
	msgConfig     = 1
	cfgCmd        = 1
	cfgMode       = 2
	cfgTimeout    = 4
	cfgQThresh    = 5
	cmdBind       = 1
	cmdUnbind     = 2
	cmdPFBind     = 3
	copyPacket    = 2
	attrIndev     = 4
	attrOutdev    = 5
	attrTimestamp = 3
	attrPayload   = 9
	attrPrefix    = 10
)

// copyRange is how much of each packet to read: an IPv6 header and a TCP
// header without options fit.
const copyRange = 80

// Record is one logged packet.
type Record struct {
	Prefix        string
	InDev, OutDev uint32
	Time          time.Time
	Src, Dst      netip.Addr
	// Proto is the IP protocol number; SrcPort and DstPort are set for
	// TCP, UDP and SCTP.
	Proto            uint8
	SrcPort, DstPort uint16
}

// Reader receives the records of one NFLOG group in the network namespace
// it was opened in.
type Reader struct {
	conn  *netlink.Conn
	group uint16
}

// Open binds an NFLOG group. Only one reader per group and namespace can
// bind it.
func Open(group uint16) (*Reader, error) {
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return nil, fmt.Errorf("opening nfnetlink: %w", err)
	}
	r := &Reader{conn: conn, group: group}
	// Kernels before 3.17 need the families bound; later ones ignore it.
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		_ = r.config(fam, 0, []byte{cmdPFBind}, cfgCmd)
	}
	_ = r.config(unix.AF_UNSPEC, group, []byte{cmdUnbind}, cfgCmd) // a reader that died left it bound
	if err := r.config(unix.AF_UNSPEC, group, []byte{cmdBind}, cfgCmd); err != nil {
		conn.Close()
		return nil, fmt.Errorf("binding NFLOG group %d (is another reader bound?): %w", group, err)
	}
	mode := make([]byte, 6)
	binary.BigEndian.PutUint32(mode, copyRange)
	mode[4] = copyPacket
	// Deliver at once: a record queued for a batch would arrive late.
	qthresh, timeout := binary.BigEndian.AppendUint32(nil, 1), binary.BigEndian.AppendUint32(nil, 0)
	for _, c := range []struct {
		attr uint16
		data []byte
	}{{cfgMode, mode}, {cfgQThresh, qthresh}, {cfgTimeout, timeout}} {
		if err := r.config(unix.AF_UNSPEC, group, c.data, c.attr); err != nil {
			conn.Close()
			return nil, fmt.Errorf("configuring NFLOG group %d: %w", group, err)
		}
	}
	// A flood the kernel's rate limit lets through must not block the
	// socket: lose records (ENOBUFS, counted by the caller), not time.
	_ = conn.SetReadBuffer(1 << 20)
	return r, nil
}

// config sends one configuration attribute for the group, and waits for
// the kernel's acknowledgement.
func (r *Reader) config(family uint8, group uint16, data []byte, attr uint16) error {
	ae := netlink.NewAttributeEncoder()
	ae.Bytes(attr, data)
	attrs, err := ae.Encode()
	if err != nil {
		return err
	}
	hdr := []byte{family, 0, 0, 0}
	binary.BigEndian.PutUint16(hdr[2:], group)
	_, err = r.conn.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(subsysULOG<<8 | msgConfig), Flags: netlink.Request | netlink.Acknowledge},
		Data:   append(hdr, attrs...),
	})
	return err
}

// ErrLost says the socket's buffer overflowed: records were lost.
var ErrLost = errors.New("nflog: records lost (socket buffer overflow)")

// Read waits for the next records. It returns ErrLost, with no records,
// when the kernel dropped some; reading may go on.
func (r *Reader) Read() ([]Record, error) {
	msgs, err := r.conn.Receive()
	if err != nil {
		if errors.Is(err, unix.ENOBUFS) {
			return nil, ErrLost
		}
		return nil, err
	}
	var out []Record
	for _, m := range msgs {
		if m.Header.Type != netlink.HeaderType(subsysULOG<<8|msgPacket) || len(m.Data) < 4 {
			continue
		}
		if rec, ok := decode(m.Data[4:]); ok {
			out = append(out, rec)
		}
	}
	return out, nil
}

// Close unbinds the group.
func (r *Reader) Close() error {
	_ = r.config(unix.AF_UNSPEC, r.group, []byte{cmdUnbind}, cfgCmd)
	return r.conn.Close()
}

// decode reads a packet message's attributes.
func decode(b []byte) (Record, bool) {
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return Record{}, false
	}
	ad.ByteOrder = binary.BigEndian
	var rec Record
	var payload []byte
	for ad.Next() {
		switch ad.Type() {
		case attrPrefix:
			rec.Prefix = strings.TrimRight(ad.String(), "\x00")
		case attrIndev:
			rec.InDev = ad.Uint32()
		case attrOutdev:
			rec.OutDev = ad.Uint32()
		case attrTimestamp:
			if t := ad.Bytes(); len(t) == 16 {
				rec.Time = time.Unix(int64(binary.BigEndian.Uint64(t)), int64(binary.BigEndian.Uint64(t[8:]))*1000)
			}
		case attrPayload:
			payload = ad.Bytes()
		}
	}
	if ad.Err() != nil {
		return Record{}, false
	}
	if rec.Time.IsZero() {
		rec.Time = time.Now()
	}
	parsePacket(&rec, payload)
	return rec, true
}

// parsePacket reads the addresses, protocol and ports of an IP packet.
func parsePacket(rec *Record, p []byte) {
	if len(p) < 1 {
		return
	}
	var l4 []byte
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return
		}
		ihl := int(p[0]&0x0f) * 4
		rec.Proto = p[9]
		rec.Src, _ = netip.AddrFromSlice(p[12:16])
		rec.Dst, _ = netip.AddrFromSlice(p[16:20])
		if ihl >= 20 && len(p) >= ihl {
			l4 = p[ihl:]
		}
	case 6:
		if len(p) < 40 {
			return
		}
		rec.Proto = p[6] // extension headers are not followed
		rec.Src, _ = netip.AddrFromSlice(p[8:24])
		rec.Dst, _ = netip.AddrFromSlice(p[24:40])
		l4 = p[40:]
	}
	switch rec.Proto {
	case unix.IPPROTO_TCP, unix.IPPROTO_UDP, unix.IPPROTO_SCTP:
		if len(l4) >= 4 {
			rec.SrcPort, rec.DstPort = binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
		}
	}
}
