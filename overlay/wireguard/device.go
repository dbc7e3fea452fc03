package wireguard

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"

	"github.com/sluice-net/sluice/overlay/netconf"
)

// Implementation makes and removes the node's WireGuard devices and
// configures them. Kernel and Userspace implement it; the overlay loop
// uses one for its whole life.
type Implementation interface {
	// Name is netconf.WireGuardKernel or netconf.WireGuardUserspace.
	Name() string
	// Ensure makes the device exist with this MTU (not yet up), and
	// reports whether it had to create or change it.
	Ensure(name string, mtu int) (created bool, err error)
	// Client configures the devices Ensure made.
	Client() Client
	// Remove deletes a device.
	Remove(name string) error
	// Close releases the implementation when the agent stops. Kernel
	// devices stay, as VXLAN's do; a userspace device's TUN stays with its
	// addresses and routes, and the next agent reopens it.
	Close() error
}

// Choose picks the implementation: the configured one, or for "auto" the
// kernel's when this kernel can make a wireguard link. why says what
// decided it, for the log. It must run in the node's network namespace.
func Choose(mode string, u UserspaceOptions) (impl Implementation, why string, err error) {
	kernelErr := probeKernel()
	switch mode {
	case netconf.WireGuardKernel:
		if kernelErr != nil {
			return nil, "", fmt.Errorf(`Backend.Implementation "kernel": %w; use "auto" or "userspace" on this node`, kernelErr)
		}
		k, err := NewKernel()
		return k, "configured: kernel", err
	case netconf.WireGuardUserspace:
		return NewUserspace(u), "configured: userspace", nil
	}
	if kernelErr == nil {
		k, err := NewKernel()
		return k, "auto: the kernel can make wireguard links", err
	}
	return NewUserspace(u), fmt.Sprintf("auto: %v; using golang.zx2c4.com/wireguard over /dev/net/tun", kernelErr), nil
}

// probeName is the short-lived link that tests for the kernel module.
const probeName = "wgprobe-sluice"

// probeKernel tries to make a wireguard link, as flannel's wireguard
// backend would fail to, and removes it again.
func probeKernel() error {
	err := netlink.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: probeName}})
	if errors.Is(err, unix.EEXIST) {
		err = nil
	}
	if err != nil {
		return fmt.Errorf("kernel has no WireGuard (creating a wireguard link: %v)", err)
	}
	if l, err := netlink.LinkByName(probeName); err == nil {
		_ = netlink.LinkDel(l)
	}
	return nil
}

// Kernel is the kernel module's WireGuard, configured over generic
// netlink by wgctrl.
type Kernel struct {
	wg *wgctrl.Client
}

// NewKernel opens wgctrl's client, in the calling thread's network
// namespace.
func NewKernel() (*Kernel, error) {
	c, err := wgctrl.New()
	if err != nil {
		return nil, fmt.Errorf("opening wgctrl: %w", err)
	}
	return &Kernel{wg: c}, nil
}

// Name implements Implementation.
func (k *Kernel) Name() string { return netconf.WireGuardKernel }

// Ensure implements Implementation.
func (k *Kernel) Ensure(name string, mtu int) (bool, error) {
	if l, err := netlink.LinkByName(name); err == nil {
		if l.Type() == "wireguard" {
			if l.Attrs().MTU == mtu {
				return false, nil
			}
			if err := netlink.LinkSetMTU(l, mtu); err != nil {
				return false, fmt.Errorf("setting MTU of %s: %w", name, err)
			}
			return true, nil
		}
		if err := netlink.LinkDel(l); err != nil {
			return false, fmt.Errorf("removing %s, a %s device in the way of WireGuard: %w", name, l.Type(), err)
		}
	}
	if err := netlink.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: name, MTU: mtu}}); err != nil {
		return false, fmt.Errorf("creating WireGuard device %s: %w", name, err)
	}
	return true, nil
}

// Client implements Implementation.
func (k *Kernel) Client() Client { return k.wg }

// Remove implements Implementation.
func (k *Kernel) Remove(name string) error { return removeLink(name) }

// Close implements Implementation.
func (k *Kernel) Close() error { return k.wg.Close() }

func removeLink(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("reading %s: %w", name, err)
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("removing %s: %w", name, err)
	}
	return nil
}
