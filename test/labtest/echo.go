package labtest

import (
	"fmt"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// EchoConn opens a long-lived TCP connection from one pod to an echo server
// on port in another, both closed when the test ends. The returned func
// sends msg and waits up to timeout for it to come back.
func (l *Lab) EchoConn(t *testing.T, from, to string, port int, timeout time.Duration) func(msg string) error {
	t.Helper()
	server, err := l.Resolve(to)
	if err != nil {
		t.Fatal(err)
	}
	client, err := l.Resolve(from)
	if err != nil {
		t.Fatal(err)
	}
	ip, err := l.ResolveTarget(to, false)
	if err != nil {
		t.Fatal(err)
	}
	var ln net.Listener
	if err := ns.WithNetNSPath(server.NetNSPath, func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp", ":"+strconv.Itoa(port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, 64)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
		}
	}()
	conn, err := client.Dial("tcp", net.JoinHostPort(ip, strconv.Itoa(port)), 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return func(msg string) error {
		_ = conn.SetDeadline(time.Now().Add(timeout))
		if _, err := conn.Write([]byte(msg)); err != nil {
			return err
		}
		buf := make([]byte, len(msg))
		if _, err := conn.Read(buf); err != nil {
			return err
		}
		if string(buf) != msg {
			return fmt.Errorf("echo %q, got %q", msg, buf)
		}
		return nil
	}
}
