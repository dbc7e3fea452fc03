package wireguard

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/overlay/netconf"
)

// UserspaceOptions configure the userspace implementation.
type UserspaceOptions struct {
	// SocketDir receives a UAPI socket per device (NAME.sock), so `wg
	// show` and wgctrl can read the device; empty for none. wgctrl and
	// wg look in /var/run/wireguard of their own mount namespace: in a
	// container, mount that path from the host to use them there. The
	// agent itself never goes through the socket.
	SocketDir string
}

// Userspace is golang.zx2c4.com/wireguard running inside the agent over
// a TUN device: WireGuard on a kernel without the module.
//
// The TUN device is made persistent: when the agent stops, the device, its
// addresses and its routes stay, and pod traffic to other nodes meets a
// device without a reader (dropped, as on a cut cable) instead of falling
// through to the default route unencrypted. The next agent reattaches to
// it, reconfigures it at once and handshakes again; TCP retransmits what
// was lost in between.
//
// Every call must come from a thread in the node's network namespace (the
// overlay loop's): that is where the TUN device and the UDP sockets are
// made. The device's own goroutines run on any thread, so the events that
// would make them open sockets or query the device by name are filtered
// out (see pinnedTUN).
type Userspace struct {
	opts UserspaceOptions
	mu   sync.Mutex
	devs map[string]*userDevice
}

type userDevice struct {
	tun   *pinnedTUN
	dev   *device.Device
	index int
	uapi  net.Listener
}

// NewUserspace returns the implementation; devices come with Ensure.
func NewUserspace(o UserspaceOptions) *Userspace {
	return &Userspace{opts: o, devs: map[string]*userDevice{}}
}

// Name implements Implementation.
func (u *Userspace) Name() string { return netconf.WireGuardUserspace }

// Ensure implements Implementation: it (re)opens the device when the agent
// has none, or when the kernel's device went away behind its back, and
// keeps the MTU.
func (u *Userspace) Ensure(name string, mtu int) (bool, error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	link, err := netlink.LinkByName(name)
	if d := u.devs[name]; d != nil {
		if err == nil && link.Attrs().Index == d.index {
			return u.setMTU(d, link, mtu)
		}
		klog.InfoS("WireGuard TUN device went away; reopening it", "device", name)
		d.close()
		delete(u.devs, name)
	}
	if err == nil && link.Type() != "tuntap" {
		if err := netlink.LinkDel(link); err != nil {
			return false, fmt.Errorf("removing %s, a %s device in the way of the userspace WireGuard: %w", name, link.Type(), err)
		}
	}
	d, err := u.open(name, mtu)
	if err != nil {
		return false, err
	}
	u.devs[name] = d
	return true, nil
}

func (u *Userspace) setMTU(d *userDevice, link netlink.Link, mtu int) (bool, error) {
	if link.Attrs().MTU == mtu {
		return false, nil
	}
	if err := netlink.LinkSetMTU(link, mtu); err != nil {
		return false, fmt.Errorf("setting MTU of %s: %w", link.Attrs().Name, err)
	}
	d.tun.mtu.Store(int32(mtu))
	return true, nil
}

// open attaches to (or creates) the persistent TUN device and starts
// WireGuard on it.
func (u *Userspace) open(name string, mtu int) (*userDevice, error) {
	t, err := tun.CreateTUN(name, mtu)
	if errors.Is(err, unix.EBUSY) {
		// Never take the device from a process that has it open (a
		// second agent on the node): the two would take turns.
		return nil, fmt.Errorf("TUN device %s is held by another process (is another sluiced running on this node?): %w", name, err)
	}
	if err != nil {
		// A TUN device left with settings this one cannot attach with:
		// make a new one.
		if l, lerr := netlink.LinkByName(name); lerr == nil && netlink.LinkDel(l) == nil {
			t, err = tun.CreateTUN(name, mtu)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("opening TUN device %s (is /dev/net/tun there?): %w", name, err)
	}
	if err := setPersist(t, true); err != nil {
		t.Close()
		return nil, err
	}
	link, err := netlink.LinkByName(name)
	if err != nil {
		t.Close()
		return nil, fmt.Errorf("reading TUN device %s: %w", name, err)
	}
	if link.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			t.Close()
			return nil, fmt.Errorf("setting MTU of %s: %w", name, err)
		}
	}
	p := newPinnedTUN(t, mtu)
	d := &userDevice{tun: p, index: link.Attrs().Index}
	d.dev = device.NewDevice(p, conn.NewDefaultBind(), wgLogger(name))
	if err := d.dev.Up(); err != nil {
		d.dev.Close()
		return nil, fmt.Errorf("starting WireGuard on %s: %w", name, err)
	}
	if u.opts.SocketDir != "" {
		if d.uapi, err = serveUAPI(u.opts.SocketDir, name, d.dev); err != nil {
			// `wg show` is a convenience; the device works without it.
			klog.ErrorS(err, "WireGuard UAPI socket not served; wg and wgctrl cannot read the device", "device", name)
		}
	}
	return d, nil
}

func setPersist(t tun.Device, on bool) error {
	nt, ok := t.(*tun.NativeTun)
	if !ok {
		return nil
	}
	raw, err := nt.File().SyscallConn()
	if err != nil {
		return fmt.Errorf("TUN device: %w", err)
	}
	v := 0
	if on {
		v = 1
	}
	var ioErr error
	if err := raw.Control(func(fd uintptr) { ioErr = unix.IoctlSetInt(int(fd), unix.TUNSETPERSIST, v) }); err != nil {
		return fmt.Errorf("TUN device: %w", err)
	}
	if ioErr != nil {
		return fmt.Errorf("making the TUN device persistent: %w", ioErr)
	}
	return nil
}

// serveUAPI answers wg and wgctrl on dir/NAME.sock.
func serveUAPI(dir, name string, dev *device.Device) (net.Listener, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	path := filepath.Join(dir, name+".sock")
	_ = os.Remove(path) // a former agent's
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go dev.IpcHandle(c)
		}
	}()
	return l, nil
}

func (d *userDevice) close() {
	if d.uapi != nil {
		d.uapi.Close()
	}
	d.dev.Close()
}

// Client implements Implementation.
func (u *Userspace) Client() Client { return userClient{u} }

// Remove implements Implementation.
func (u *Userspace) Remove(name string) error {
	u.mu.Lock()
	if d := u.devs[name]; d != nil {
		d.close()
		delete(u.devs, name)
	}
	u.mu.Unlock()
	return removeLink(name)
}

// Close implements Implementation. The persistent TUN devices stay.
func (u *Userspace) Close() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	for name, d := range u.devs {
		d.close()
		delete(u.devs, name)
	}
	return nil
}

// userClient configures the agent's own devices with the UAPI text,
// through the device's in-process entry points.
type userClient struct{ u *Userspace }

func (c userClient) dev(name string) (*device.Device, error) {
	c.u.mu.Lock()
	defer c.u.mu.Unlock()
	d := c.u.devs[name]
	if d == nil {
		return nil, fmt.Errorf("no userspace WireGuard device %s: %w", name, os.ErrNotExist)
	}
	return d.dev, nil
}

func (c userClient) Device(name string) (*wgtypes.Device, error) {
	dev, err := c.dev(name)
	if err != nil {
		return nil, err
	}
	text, err := dev.IpcGet()
	if err != nil {
		return nil, err
	}
	return parseDevice(name, text)
}

func (c userClient) ConfigureDevice(name string, cfg wgtypes.Config) error {
	dev, err := c.dev(name)
	if err != nil {
		return err
	}
	return dev.IpcSet(encodeConfig(cfg))
}

// pinnedTUN hides from wireguard-go the TUN events that would make its
// goroutines act in whatever network namespace their thread is in: "up"
// (which opens the UDP sockets) and the MTU query by interface name. The
// overlay loop brings the device up and sets the MTU itself, from the
// node's namespace.
type pinnedTUN struct {
	tun.Device
	mtu    atomic.Int32
	events chan tun.Event
}

func newPinnedTUN(t tun.Device, mtu int) *pinnedTUN {
	p := &pinnedTUN{Device: t, events: make(chan tun.Event, 5)}
	p.mtu.Store(int32(mtu))
	go func() {
		defer close(p.events)
		for e := range t.Events() {
			if e&tun.EventMTUUpdate != 0 {
				p.events <- tun.EventMTUUpdate
			}
		}
	}()
	return p
}

func (p *pinnedTUN) Events() <-chan tun.Event { return p.events }

func (p *pinnedTUN) MTU() (int, error) { return int(p.mtu.Load()), nil }

func wgLogger(name string) *device.Logger {
	return &device.Logger{
		Verbosef: func(format string, args ...any) {
			klog.V(5).InfoS("wireguard-go", "device", name, "msg", fmt.Sprintf(format, args...))
		},
		Errorf: func(format string, args ...any) {
			klog.InfoS("wireguard-go error", "device", name, "msg", fmt.Sprintf(format, args...))
		},
	}
}
