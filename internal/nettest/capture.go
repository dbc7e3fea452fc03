package nettest

import (
	"bytes"
	"encoding/binary"
	"net"
	"sync"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// Capture records every frame that crosses an interface of a namespace,
// in both directions, as tcpdump would (which this machine does not have).
type Capture struct {
	fd     int
	mu     sync.Mutex
	frames [][]byte
	done   chan struct{}
	ended  chan struct{}
}

// StartCapture opens a packet socket on ifname inside n. It stops when the
// test ends, or at Stop.
func StartCapture(t testing.TB, n ns.NetNS, ifname string) *Capture {
	t.Helper()
	c := &Capture{fd: -1, done: make(chan struct{}), ended: make(chan struct{})}
	Do(t, n, func() error {
		ifi, err := net.InterfaceByName(ifname)
		if err != nil {
			return err
		}
		proto := htons(unix.ETH_P_ALL)
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(proto))
		if err != nil {
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: proto, Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return err
		}
		// A read timeout lets Stop end the reader.
		tv := unix.Timeval{Usec: 100000}
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		c.fd = fd
		return nil
	})
	go c.read()
	t.Cleanup(c.Stop)
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// read records frames until Stop, and then what is still queued: it ends
// at the first read timeout after Stop.
func (c *Capture) read() {
	defer close(c.ended)
	defer unix.Close(c.fd)
	buf := make([]byte, 65536)
	stopping := false
	for {
		if !stopping {
			select {
			case <-c.done:
				stopping = true
			default:
			}
		}
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if err != nil || n <= 0 {
			if stopping && (err == unix.EAGAIN || err == unix.EWOULDBLOCK) {
				return
			}
			continue
		}
		c.mu.Lock()
		c.frames = append(c.frames, append([]byte(nil), buf[:n]...))
		c.mu.Unlock()
	}
}

// Stop ends the capture once what the kernel queued is read; the frames
// stay readable.
func (c *Capture) Stop() {
	select {
	case <-c.done:
	default:
		close(c.done)
	}
	if c.fd >= 0 {
		<-c.ended
	}
}

// Contains reports whether any captured frame holds b.
func (c *Capture) Contains(b []byte) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, f := range c.frames {
		if bytes.Contains(f, b) {
			return true
		}
	}
	return false
}

// Flow is the transport of one captured IP packet.
type Flow struct {
	Proto            uint8 // IP protocol number
	SrcPort, DstPort uint16
}

// IPFlows lists the protocol and ports of every captured IPv4 and IPv6
// packet (ports are 0 for protocols without them).
func (c *Capture) IPFlows() []Flow {
	c.mu.Lock()
	defer c.mu.Unlock()
	var flows []Flow
	for _, f := range c.frames {
		if len(f) < 14 {
			continue
		}
		var proto uint8
		var l4 []byte
		switch binary.BigEndian.Uint16(f[12:14]) {
		case unix.ETH_P_IP:
			ip := f[14:]
			if len(ip) < 20 {
				continue
			}
			proto, l4 = ip[9], ip[int(ip[0]&0x0f)*4:]
		case unix.ETH_P_IPV6:
			ip := f[14:]
			if len(ip) < 40 {
				continue
			}
			proto, l4 = ip[6], ip[40:]
		default:
			continue
		}
		fl := Flow{Proto: proto}
		if (proto == unix.IPPROTO_UDP || proto == unix.IPPROTO_TCP) && len(l4) >= 4 {
			fl.SrcPort, fl.DstPort = binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
		}
		flows = append(flows, fl)
	}
	return flows
}
