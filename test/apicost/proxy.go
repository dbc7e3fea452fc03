// Package apicost measures what one agent costs the API server: the bytes
// it receives on the wire (TLS included) at start, at rest, for one Pod
// label change, and after its watches drop.
package apicost

import (
	"io"
	"net"
	"sync"
	"sync/atomic"

	"github.com/containernetworking/plugins/pkg/ns"
)

// countingProxy forwards TCP from a listener in a node's namespace to the
// API server, counting the bytes the server sends. TLS passes through, so
// the count is what the agent's socket receives.
type countingProxy struct {
	ln       net.Listener
	upstream string
	netns    string
	down     atomic.Int64

	mu    sync.Mutex
	conns map[net.Conn]bool
}

// newCountingProxy listens on 127.0.0.1:port inside the namespace at
// netnsPath; each node's loopback is its own, so every node can use the
// same port.
func newCountingProxy(netnsPath, port, upstream string) (*countingProxy, error) {
	p := &countingProxy{upstream: upstream, netns: netnsPath, conns: map[net.Conn]bool{}}
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		var err error
		p.ln, err = net.Listen("tcp", "127.0.0.1:"+port)
		return err
	})
	if err != nil {
		return nil, err
	}
	go p.serve()
	return p, nil
}

func (p *countingProxy) serve() {
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		go p.forward(c)
	}
}

func (p *countingProxy) forward(c net.Conn) {
	var up net.Conn
	err := ns.WithNetNSPath(p.netns, func(ns.NetNS) error {
		var err error
		up, err = net.Dial("tcp", p.upstream)
		return err
	})
	if err != nil {
		c.Close()
		return
	}
	p.mu.Lock()
	p.conns[c], p.conns[up] = true, true
	p.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(countingWriter{c, &p.down}, up); done <- struct{}{} }()
	<-done
	c.Close()
	up.Close()
	<-done
	p.mu.Lock()
	delete(p.conns, c)
	delete(p.conns, up)
	p.mu.Unlock()
}

// dropAll closes every open connection, as a load balancer restart or a
// network blip would: the agent's watches drop.
func (p *countingProxy) dropAll() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	for c := range p.conns {
		c.Close()
	}
	return len(p.conns) / 2
}

func (p *countingProxy) close() {
	p.ln.Close()
	p.dropAll()
}

type countingWriter struct {
	w io.Writer
	n *atomic.Int64
}

func (c countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.n.Add(int64(n))
	return n, err
}
