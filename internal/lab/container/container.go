// Package container is the lab's smallest possible container runtime: it
// turns one process into a container of a lab pod by giving it its own root
// filesystem and mounts, then executes the container's command in place.
//
// The lab kubelet starts `sluicectl lab container-init` in a new mount
// namespace (a child of the node's) and in the node's network namespace
// (the lab only runs hostNetwork pods this way). Init then builds the root:
//
//   - the base layer is the host's root filesystem, read through an overlay
//     whose writable layer is a tmpfs, so mount points for volumes can be
//     made anywhere (/etc/sluice, /host/opt/cni/bin) without touching the
//     host;
//   - the image layer is a staged directory whose files are bound on top
//     (overlayfs refuses a lower layer inside another one, and the staged
//     image lives under the host's root);
//   - /proc, a sysfs of the node's network namespace, /dev, and a private
//     /run and /tmp, as a container runtime provides them;
//   - every volume bound at its mountPath.
//
// It pivots into that root and execs the command, so the container's
// process is the kubelet's direct child and carries the command's name.
package container

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Spec is what init needs to start one container.
type Spec struct {
	// Scratch is an empty directory for the tmpfs that holds the overlay's
	// writable layer and the new root.
	Scratch string `json:"scratch"`
	// Image is the staged image: its files are laid over the base layer.
	Image string `json:"image"`
	// Mounts are bound in order, after the image.
	Mounts []Mount  `json:"mounts"`
	Argv   []string `json:"argv"`
	Env    []string `json:"env"`
	Dir    string   `json:"dir,omitempty"`
}

// Mount binds Source (a path as the node sees it) at Target inside the
// container.
type Mount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly,omitempty"`
}

// ReadSpec reads a spec the kubelet wrote.
func ReadSpec(path string) (*Spec, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading container spec: %w", err)
	}
	var s Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("parsing container spec %s: %w", path, err)
	}
	if len(s.Argv) == 0 {
		return nil, fmt.Errorf("container spec %s has no command", path)
	}
	return &s, nil
}

// oldRoot is where the node's root stays reachable between pivot_root and
// the binds of volumes; it is detached before the command runs.
const oldRoot = "/.lab-old-root"

// Init builds the container's root and execs its command. It only returns
// on error. It must run as the only thread that matters in a fresh, private
// mount namespace: the caller starts it with CLONE_NEWNS.
func Init(s *Spec) error {
	root, err := buildRoot(s)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Join(root, oldRoot), 0o700); err != nil {
		return fmt.Errorf("creating %s: %w", oldRoot, err)
	}
	if err := unix.PivotRoot(root, filepath.Join(root, oldRoot)); err != nil {
		return fmt.Errorf("pivot_root to %s: %w", root, err)
	}
	if err := os.Chdir("/"); err != nil {
		return err
	}
	// Volumes are bound after the pivot, so that a target path is resolved
	// inside the container: /var/run is a symlink to /run, and outside the
	// new root it would lead to the node's /run.
	for _, m := range s.Mounts {
		if err := bindVolume(filepath.Join(oldRoot, m.Source), m.Target, m.ReadOnly); err != nil {
			return err
		}
	}
	if err := unix.Unmount(oldRoot, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("detaching the node's root: %w", err)
	}
	_ = os.Remove(oldRoot)
	dir := s.Dir
	if dir == "" {
		dir = "/"
	}
	if err := os.Chdir(dir); err != nil {
		return fmt.Errorf("working directory %s: %w", dir, err)
	}
	argv0, err := lookPath(s.Argv[0], s.Env)
	if err != nil {
		return err
	}
	return fmt.Errorf("exec %s: %w", argv0, syscall.Exec(argv0, s.Argv, s.Env))
}

// buildRoot mounts the root filesystem under s.Scratch and returns it.
func buildRoot(s *Spec) (string, error) {
	if err := unix.Mount("tmpfs", s.Scratch, "tmpfs", 0, "mode=0755"); err != nil {
		return "", fmt.Errorf("mounting the container's scratch tmpfs: %w", err)
	}
	upper, work, root := filepath.Join(s.Scratch, "upper"), filepath.Join(s.Scratch, "work"), filepath.Join(s.Scratch, "root")
	for _, d := range []string{upper, work, root} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return "", err
		}
	}
	opts := fmt.Sprintf("lowerdir=/,upperdir=%s,workdir=%s", upper, work)
	if err := unix.Mount("overlay", root, "overlay", 0, opts); err != nil {
		return "", fmt.Errorf("mounting the root overlay (%s): %w", opts, err)
	}
	if err := layImage(s.Image, root); err != nil {
		return "", err
	}
	type special struct{ fstype, source, target, data string }
	for _, m := range []special{
		{"proc", "proc", "/proc", ""},
		// A fresh sysfs shows the mounting process's network namespace:
		// the node's.
		{"sysfs", "sysfs", "/sys", ""},
		{"tmpfs", "tmpfs", "/run", "mode=0755"},
		{"tmpfs", "tmpfs", "/tmp", "mode=1777"},
	} {
		t := filepath.Join(root, m.target)
		if err := os.MkdirAll(t, 0o755); err != nil {
			return "", err
		}
		if err := unix.Mount(m.source, t, m.fstype, unix.MS_NOSUID|unix.MS_NODEV, m.data); err != nil {
			return "", fmt.Errorf("mounting %s at %s: %w", m.fstype, m.target, err)
		}
	}
	if err := unix.Mount("/dev", filepath.Join(root, "dev"), "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return "", fmt.Errorf("binding /dev: %w", err)
	}
	return root, nil
}

// layImage binds every file of the staged image at the same path in root.
func layImage(image, root string) error {
	return filepath.WalkDir(image, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("reading image %s: %w", image, err)
		}
		if d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(image, p)
		return bindVolume(p, filepath.Join(root, rel), true)
	})
}

// bindVolume binds source at target, creating target as a file or a
// directory like source.
func bindVolume(source, target string, readOnly bool) error {
	st, err := os.Stat(source)
	if err != nil {
		return fmt.Errorf("volume source: %w", err)
	}
	if st.IsDir() {
		err = os.MkdirAll(target, 0o755)
	} else {
		err = touch(target)
	}
	if err != nil {
		return fmt.Errorf("creating mount point %s: %w", target, err)
	}
	if err := unix.Mount(source, target, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("binding %s at %s: %w", source, target, err)
	}
	if readOnly {
		if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("making %s read-only: %w", target, err)
		}
	}
	return nil
}

func touch(path string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// lookPath finds a command without a slash in the container's PATH, as a
// container runtime does.
func lookPath(cmd string, env []string) (string, error) {
	if strings.Contains(cmd, "/") {
		return cmd, nil
	}
	path := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, e := range env {
		if v, ok := strings.CutPrefix(e, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		p := filepath.Join(dir, cmd)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("command %q not found in PATH %s", cmd, path)
}
