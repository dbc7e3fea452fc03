package lab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"k8s.io/klog/v2"
)

// Responder answers every TCP connection and UDP datagram on one port with
// a line of text. Lab pods use it to stand in for containers, and the
// outside-world host to report the source address it saw.
type Responder struct {
	tcp net.Listener
	udp net.PacketConn
}

// ListenResponder opens TCP and UDP sockets on port inside netnsPath (the
// caller's namespace when empty) on all addresses. Sockets keep the
// namespace they were created in, so serving needs no locked thread.
func ListenResponder(netnsPath string, port int, reply func(remote net.Addr) string) (*Responder, error) {
	r := &Responder{}
	listen := func() error {
		var err error
		addr := net.JoinHostPort("::", strconv.Itoa(port))
		if r.tcp, err = net.Listen("tcp", addr); err != nil {
			return fmt.Errorf("listening on tcp %d: %w", port, err)
		}
		if r.udp, err = net.ListenPacket("udp", addr); err != nil {
			r.tcp.Close()
			return fmt.Errorf("listening on udp %d: %w", port, err)
		}
		return nil
	}
	if netnsPath == "" {
		if err := listen(); err != nil {
			return nil, err
		}
	} else if err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error { return listen() }); err != nil {
		return nil, err
	}
	go r.serveTCP(reply)
	go r.serveUDP(reply)
	return r, nil
}

func (r *Responder) serveTCP(reply func(net.Addr) string) {
	for {
		c, err := r.tcp.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				klog.ErrorS(err, "responder accept failed")
			}
			return
		}
		go func() {
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(5 * time.Second))
			_, _ = c.Write([]byte(reply(c.RemoteAddr()) + "\n"))
		}()
	}
}

func (r *Responder) serveUDP(reply func(net.Addr) string) {
	buf := make([]byte, 2048)
	for {
		_, from, err := r.udp.ReadFrom(buf)
		if err != nil {
			return
		}
		_, _ = r.udp.WriteTo([]byte(reply(from)+"\n"), from)
	}
}

// Close stops serving.
func (r *Responder) Close() {
	r.tcp.Close()
	r.udp.Close()
}

// serveExternal runs the outside world's responder until ctx ends.
func serveExternal(ctx context.Context, s *State) error {
	r, err := ListenResponder(netnsPath(s.ExternalNS), ExternalPort, func(remote net.Addr) string {
		host, _, _ := net.SplitHostPort(remote.String())
		return "external from=" + host
	})
	if err != nil {
		return fmt.Errorf("starting the outside world's responder: %w", err)
	}
	go func() { <-ctx.Done(); r.Close() }()
	return nil
}
