package lab

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
)

// netnsPath is where iproute2 pins named network namespaces.
func netnsPath(name string) string { return filepath.Join("/run/netns", name) }

// run executes a command and folds its output into the error, so a failed
// `ip` call says what the kernel answered.
func run(name string, args ...string) error {
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(out.String()))
	}
	return nil
}

// ipn runs `ip -n NS ...`.
func ipn(netns string, args ...string) error {
	return run("ip", append([]string{"-n", netns}, args...)...)
}

// member is one host attached to the underlay bridge.
type member struct {
	netns, port, ip4, ip6 string
}

// buildTopology creates the underlay bridge and attaches every member to it.
// Each veth is created inside the underlay namespace with its peer placed
// straight into the member's namespace, so no link ever exists in the root
// namespace, not even for a moment.
func buildTopology(s *State) error {
	for _, n := range s.NetNSes {
		if err := run("ip", "netns", "add", n); err != nil {
			return err
		}
		if err := ipn(n, "link", "set", "lo", "up"); err != nil {
			return err
		}
	}
	if err := ipn(s.UnderlayNS, "link", "add", "br0", "type", "bridge"); err != nil {
		return err
	}
	if err := ipn(s.UnderlayNS, "link", "set", "br0", "up"); err != nil {
		return err
	}
	members := []member{
		{s.ControlNS, "cp", s.ControlIP4, s.ControlIP6},
		{s.ExternalNS, "ext", s.ExternalIP4, s.ExternalIP6},
	}
	for i, n := range s.Nodes {
		members = append(members, member{n.NetNS, fmt.Sprintf("node%d", i+1), n.IP4, n.IP6})
	}
	for _, m := range members {
		if err := attach(s, m); err != nil {
			return fmt.Errorf("attaching %s to the underlay: %w", m.netns, err)
		}
	}
	// The outside world answers on ExternalPort; it forwards nothing.
	for _, n := range s.Nodes {
		if err := configureNode(s, n); err != nil {
			return fmt.Errorf("configuring node %s: %w", n.Name, err)
		}
	}
	return nil
}

func attach(s *State, m member) error {
	if err := ipn(s.UnderlayNS, "link", "add", m.port, "type", "veth", "peer", "name", "eth0", "netns", m.netns); err != nil {
		return err
	}
	if err := ipn(s.UnderlayNS, "link", "set", m.port, "master", "br0", "up"); err != nil {
		return err
	}
	if err := ipn(m.netns, "addr", "add", m.ip4+"/24", "dev", "eth0"); err != nil {
		return err
	}
	if m.ip6 != "" {
		// nodad: duplicate address detection would delay the address by
		// about two seconds, and the lab assigns addresses itself.
		if err := ipn(m.netns, "addr", "add", m.ip6+"/64", "dev", "eth0", "nodad"); err != nil {
			return err
		}
	}
	return ipn(m.netns, "link", "set", "eth0", "up")
}

// configureNode gives a node a default route via the outside world, as a
// real node has one via its gateway. Proxy ARP for pods (169.254.1.1) needs
// the node to have a route to that address, and egress tests need a way out.
func configureNode(s *State, n Node) error {
	if err := ipn(n.NetNS, "route", "add", "default", "via", s.ExternalIP4); err != nil {
		return err
	}
	if n.IP6 != "" {
		if err := ipn(n.NetNS, "-6", "route", "add", "default", "via", s.ExternalIP6); err != nil {
			return err
		}
	}
	return inNetNS(n.NetNS, func() error {
		for _, k := range []string{"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"} {
			if err := os.WriteFile("/proc/sys/"+k, []byte("1"), 0o644); err != nil {
				return fmt.Errorf("sysctl %s: %w", k, err)
			}
		}
		return nil
	})
}

// inNetNS runs fn on a thread inside the named network namespace.
func inNetNS(name string, fn func() error) error {
	netns, err := ns.GetNS(netnsPath(name))
	if err != nil {
		return fmt.Errorf("opening netns %s: %w", name, err)
	}
	defer netns.Close()
	return netns.Do(func(ns.NetNS) error { return fn() })
}

// deleteNetNS removes a pinned namespace, ignoring one that is already gone.
func deleteNetNS(name string) error {
	if _, err := os.Stat(netnsPath(name)); os.IsNotExist(err) {
		return nil
	}
	return run("ip", "netns", "delete", name)
}
