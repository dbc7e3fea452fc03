package lab

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// PodRecord is what a lab kubelet publishes about a running pod sandbox, so
// that `lab exec` and `lab probe` can find it without the API server.
type PodRecord struct {
	Namespace string   `json:"namespace"`
	Name      string   `json:"name"`
	UID       string   `json:"uid"`
	Node      string   `json:"node"`
	NetNS     string   `json:"netns"` // path inside the node's mount namespace
	IPs       []string `json:"ips"`
	// HostNetwork pods share the node's namespace.
	HostNetwork bool `json:"hostNetwork,omitempty"`
}

// PodRecordPath is where a node's kubelet writes the record of a pod.
func (n Node) PodRecordPath(namespace, name string) string {
	return filepath.Join(n.Dir, "pods", namespace+"_"+name+".json")
}

// FindPod looks up a running pod, given as namespace/name, on every node.
func (s *State) FindPod(ref string) (*PodRecord, *Node, error) {
	namespace, name, ok := strings.Cut(ref, "/")
	if !ok || namespace == "" || name == "" {
		return nil, nil, fmt.Errorf("pod must be given as namespace/name, got %q", ref)
	}
	if s.RealNodes() {
		return s.findRealPod(namespace, name)
	}
	for i := range s.Nodes {
		b, err := os.ReadFile(s.Nodes[i].PodRecordPath(namespace, name))
		if err != nil {
			continue
		}
		var r PodRecord
		if err := json.Unmarshal(b, &r); err != nil {
			return nil, nil, fmt.Errorf("reading record of pod %s: %w", ref, err)
		}
		return &r, &s.Nodes[i], nil
	}
	return nil, nil, fmt.Errorf("pod %s is not running in this lab", ref)
}

// Place is somewhere a command can run: a node, a pod, the outside world or
// the control plane.
type Place struct {
	// NetNSPath is reachable from the root mount namespace.
	NetNSPath string
	// MountPID, when set, is a process whose mount namespace to enter.
	MountPID int
}

// Resolve turns NODE, namespace/POD, "external" or "control-plane" into a
// Place.
func (s *State) Resolve(where string) (Place, error) {
	switch where {
	case "external":
		return Place{NetNSPath: netnsPath(s.ExternalNS)}, nil
	case "control-plane":
		return Place{NetNSPath: netnsPath(s.ControlNS)}, nil
	}
	if n, ok := s.Node(where); ok {
		pid := n.KubeletPID()
		if !processAlive(pid) {
			return Place{NetNSPath: netnsPath(n.NetNS)}, nil
		}
		return Place{NetNSPath: netnsPath(n.NetNS), MountPID: pid}, nil
	}
	if strings.Contains(where, "/") {
		rec, n, err := s.FindPod(where)
		if err != nil {
			return Place{}, err
		}
		pid := n.KubeletPID()
		if !processAlive(pid) {
			return Place{}, fmt.Errorf("the kubelet of node %s is not running", n.Name)
		}
		if rec.HostNetwork {
			return Place{NetNSPath: netnsPath(n.NetNS), MountPID: pid}, nil
		}
		if s.RealNodes() {
			// A container's process, reachable from the root namespace.
			return Place{NetNSPath: rec.NetNS, MountPID: pid}, nil
		}
		return Place{NetNSPath: fmt.Sprintf("/proc/%d/root%s", pid, rec.NetNS), MountPID: pid}, nil
	}
	return Place{}, fmt.Errorf("%q is not a node, a pod (namespace/name), external or control-plane", where)
}

// Command builds a command that runs argv in the place's namespaces.
func (p Place) Command(argv ...string) *exec.Cmd {
	args := []string{"--net=" + p.NetNSPath}
	if p.MountPID != 0 {
		args = append(args, fmt.Sprintf("--mount=/proc/%d/ns/mnt", p.MountPID))
	}
	args = append(args, "--")
	return exec.Command("nsenter", append(args, argv...)...)
}

// ResolveTarget turns a probe target (namespace/POD, NODE, external, or an
// IP) into an IP address.
func (s *State) ResolveTarget(target string, ipv6 bool) (string, error) {
	pick := func(v4, v6 string) (string, error) {
		if ipv6 {
			if v6 == "" {
				return "", fmt.Errorf("%s has no IPv6 address", target)
			}
			return v6, nil
		}
		return v4, nil
	}
	if ip := net.ParseIP(target); ip != nil {
		return target, nil
	}
	if target == "external" {
		return pick(s.ExternalIP4, s.ExternalIP6)
	}
	if n, ok := s.Node(target); ok {
		return pick(n.IP4, n.IP6)
	}
	rec, _, err := s.FindPod(target)
	if err != nil {
		return "", err
	}
	for _, ip := range rec.IPs {
		if (net.ParseIP(ip).To4() == nil) == ipv6 {
			return ip, nil
		}
	}
	return "", fmt.Errorf("pod %s has no IPv%s address", target, map[bool]string{false: "4", true: "6"}[ipv6])
}

// ErrNoAnswer means a probe got no reply.
var ErrNoAnswer = errors.New("no answer")

// Probe connects from a place to ip:port over TCP (or sends a UDP datagram)
// and returns the first line of the reply. Lab pods, nodes and the outside
// world greet a TCP connection and answer any datagram. A TCP server that
// says nothing first, such as agnhost netexec on real nodes, is asked
// "GET /hostname" over HTTP and the answer is the body; UDP datagrams say
// "hostname", which netexec answers with the pod's name.
func Probe(from Place, ip string, port int, udp bool, timeout time.Duration) (string, error) {
	var reply string
	addr := net.JoinHostPort(ip, strconv.Itoa(port))
	err := ns.WithNetNSPath(from.NetNSPath, func(ns.NetNS) error {
		network := "tcp"
		if udp {
			network = "udp"
		}
		c, err := net.DialTimeout(network, addr, timeout)
		if err != nil {
			return err
		}
		defer c.Close()
		deadline := time.Now().Add(timeout)
		_ = c.SetDeadline(deadline)
		if udp {
			if _, err := c.Write([]byte("hostname\n")); err != nil {
				return err
			}
		}
		if udp {
			// One datagram is the answer; lab responders end it with a
			// newline, agnhost's do not.
			buf := make([]byte, 2048)
			n, err := c.Read(buf)
			if err != nil {
				return err
			}
			reply, _, _ = strings.Cut(strings.TrimSpace(string(buf[:n])), "\n")
			return nil
		}
		r := bufio.NewReader(c)
		if !udp {
			// A greeting comes at once; wait a little for one.
			_ = c.SetReadDeadline(time.Now().Add(min(300*time.Millisecond, timeout/2)))
			if _, err := r.Peek(1); err != nil {
				var ne net.Error
				if !errors.As(err, &ne) || !ne.Timeout() {
					return err
				}
				_ = c.SetDeadline(deadline)
				return httpHostname(c, r, ip, &reply)
			}
			_ = c.SetDeadline(deadline)
		}
		line, err := r.ReadString('\n')
		if err != nil && line == "" {
			return err
		}
		reply = strings.TrimSpace(line)
		return nil
	})
	if err != nil {
		return "", fmt.Errorf("%w from %s: %v", ErrNoAnswer, addr, err)
	}
	return reply, nil
}

// httpHostname asks an HTTP server for /hostname and returns the body.
func httpHostname(c net.Conn, r *bufio.Reader, host string, reply *string) error {
	if _, err := fmt.Fprintf(c, "GET /hostname HTTP/1.0\r\nHost: %s\r\n\r\n", host); err != nil {
		return err
	}
	status, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(status, "HTTP/") {
		*reply = strings.TrimSpace(status)
		return nil
	}
	for {
		l, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		if strings.TrimSpace(l) == "" {
			break
		}
	}
	body, _ := r.ReadString('\n')
	*reply = strings.TrimSpace(body)
	if *reply == "" {
		*reply = strings.TrimSpace(status)
	}
	return nil
}

// Dial opens a connection from inside the place's network namespace.
func (p Place) Dial(network, addr string, timeout time.Duration) (net.Conn, error) {
	var conn net.Conn
	err := ns.WithNetNSPath(p.NetNSPath, func(ns.NetNS) error {
		var err error
		conn, err = net.DialTimeout(network, addr, timeout)
		return err
	})
	return conn, err
}
