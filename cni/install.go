package cni

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/sluice-net/sluice/internal/atomicfile"
)

// Installed file names.
const (
	ConflistName   = "10-sluice.conflist"
	KubeconfigName = "sluice-kubeconfig"
	// manifestName lists what install wrote; it has no .conf/.json ending
	// so runtimes never read it as a network.
	manifestName = "sluice-install.manifest"
)

// Plugins install copies into the CNI bin dir.
var Plugins = []string{"sluice", "host-local", "portmap", "bandwidth", "loopback"}

// DefaultConflist chains sluice with the reference portmap and bandwidth
// plugins, each receiving the previous result.
const DefaultConflist = `{
  "cniVersion": "1.0.0",
  "name": "sluice",
  "plugins": [
    {"type": "sluice", "ipam": {"type": "host-local", "subnet": "usePodCidr"}},
    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true},
    {"type": "bandwidth", "capabilities": {"bandwidth": true}}
  ]
}
`

// InstallOptions say where to install from and to.
type InstallOptions struct {
	SrcBinDir string // holds the plugins to copy
	BinDir    string // the host's CNI bin dir
	ConfDir   string // the host's CNI conf dir
	// Conflist is the conflist to write; DefaultConflist when empty.
	Conflist string
	// Kubeconfig credentials: the ServiceAccount token and CA, and the API
	// server. Without a token no kubeconfig is written.
	TokenFile, CAFile, Server string
}

type manifest struct {
	// Created are the files install made that did not exist before;
	// uninstall removes exactly these. Each is "bin/NAME" or "conf/NAME",
	// relative to the CNI bin or conf dir: the installer (a DaemonSet's
	// init container) sees those dirs at other paths than the host or an
	// uninstalling container does. Records of older versions hold
	// absolute paths.
	Created []string `json:"created"`
}

// Record prefixes of the two dirs install writes to.
const (
	recordBin  = "bin/"
	recordConf = "conf/"
)

// installedPath resolves a record entry against the dirs as seen now.
func installedPath(entry, binDir, confDir string) (string, bool) {
	switch {
	case filepath.IsAbs(entry):
		return entry, true
	case strings.HasPrefix(entry, recordBin) && filepath.Base(entry) == entry[len(recordBin):]:
		return filepath.Join(binDir, entry[len(recordBin):]), true
	case strings.HasPrefix(entry, recordConf) && filepath.Base(entry) == entry[len(recordConf):]:
		return filepath.Join(confDir, entry[len(recordConf):]), true
	}
	return "", false // not ours to interpret: never remove it
}

// Install copies the plugins and writes the conflist and kubeconfig, each
// atomically, and records what it created.
func Install(o InstallOptions) ([]string, error) {
	if o.Conflist == "" {
		o.Conflist = DefaultConflist
	}
	var probe map[string]any
	if err := json.Unmarshal([]byte(o.Conflist), &probe); err != nil {
		return nil, fmt.Errorf("the conflist is not valid JSON: %w", err)
	}
	for _, d := range []string{o.BinDir, o.ConfDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("creating %s: %w", d, err)
		}
	}
	m := readManifest(o.ConfDir)
	created := map[string]bool{}
	for _, f := range m.Created {
		created[f] = true
	}
	note := func(path, entry string) {
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			created[entry] = true
		}
	}
	var written []string
	for _, p := range Plugins {
		src, dst := filepath.Join(o.SrcBinDir, p), filepath.Join(o.BinDir, p)
		note(dst, recordBin+p)
		if err := copyAtomic(src, dst); err != nil {
			return written, err
		}
		written = append(written, dst)
	}
	conflist := filepath.Join(o.ConfDir, ConflistName)
	note(conflist, recordConf+ConflistName)
	if err := atomicfile.Write(conflist, []byte(o.Conflist), 0o644); err != nil {
		return written, err
	}
	written = append(written, conflist)
	if o.TokenFile != "" {
		if _, err := os.Stat(o.TokenFile); err == nil {
			kc, err := kubeconfig(o)
			if err != nil {
				return written, err
			}
			path := filepath.Join(o.ConfDir, KubeconfigName)
			note(path, recordConf+KubeconfigName)
			if err := atomicfile.Write(path, kc, 0o600); err != nil {
				return written, err
			}
			written = append(written, path)
		}
	}
	m.Created = m.Created[:0]
	for f := range created {
		m.Created = append(m.Created, f)
	}
	b, _ := json.MarshalIndent(m, "", "  ")
	if err := atomicfile.Write(filepath.Join(o.ConfDir, manifestName), b, 0o644); err != nil {
		return written, err
	}
	return written, nil
}

func readManifest(confDir string) manifest {
	var m manifest
	if b, err := os.ReadFile(filepath.Join(confDir, manifestName)); err == nil {
		_ = json.Unmarshal(b, &m)
	}
	return m
}

// Uninstall removes exactly the files Install created. Files that existed
// before (a reference plugin the distribution installed) stay.
func Uninstall(binDir, confDir string) ([]string, error) {
	m := readManifest(confDir)
	var removed []string
	var errs []error
	for _, entry := range m.Created {
		f, ok := installedPath(entry, binDir, confDir)
		if !ok {
			continue
		}
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, f)
	}
	if err := os.Remove(filepath.Join(confDir, manifestName)); err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, err)
	}
	return removed, errors.Join(errs...)
}

// networkName is what libcni accepts as a network name; anything else in a
// conflist must not become part of a path that is removed.
var networkName = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)

// InstalledNetwork is the network name of the conflist install wrote, or
// "sluice" when it is gone or unreadable. Read it before Uninstall.
func InstalledNetwork(confDir string) string {
	var c struct {
		Name string `json:"name"`
	}
	b, err := os.ReadFile(filepath.Join(confDir, ConflistName))
	if err != nil || json.Unmarshal(b, &c) != nil || !networkName.MatchString(c.Name) {
		return "sluice"
	}
	return c.Name
}

// RemoveState removes what the plugin keeps between calls under the CNI
// state dir (/var/lib/cni on the host): its IPAM records (dataDir's
// default, "sluice") and host-local's reservations for the network
// ("networks/<network>"). Pods still running lose nothing they hold, but
// their IPs may be handed out again; uninstall after draining.
func RemoveState(stateDir, network string) ([]string, error) {
	if !networkName.MatchString(network) {
		return nil, fmt.Errorf("%q is not a CNI network name", network)
	}
	var removed []string
	var errs []error
	for _, d := range []string{filepath.Join(stateDir, filepath.Base(DefaultDataDir)), filepath.Join(stateDir, "networks", network)} {
		if _, err := os.Stat(d); errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, d)
	}
	return removed, errors.Join(errs...)
}

func copyAtomic(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("installing %s: %w", filepath.Base(dst), err)
	}
	defer in.Close()
	tmp, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := io.Copy(tmp, in); err != nil {
		tmp.Close()
		return fmt.Errorf("installing %s: %w", dst, err)
	}
	if err := tmp.Chmod(0o755); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	// Rename, not overwrite: a runtime executing the old binary keeps it.
	return os.Rename(tmp.Name(), dst)
}

func kubeconfig(o InstallOptions) ([]byte, error) {
	tok, err := os.ReadFile(o.TokenFile)
	if err != nil {
		return nil, fmt.Errorf("reading the ServiceAccount token: %w", err)
	}
	ca, err := os.ReadFile(o.CAFile)
	if err != nil {
		return nil, fmt.Errorf("reading the cluster CA: %w", err)
	}
	if o.Server == "" {
		return nil, errors.New("the API server address is unknown: set KUBERNETES_SERVICE_HOST/PORT or --server")
	}
	return []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: sluice
  user:
    token: %s
contexts:
- name: sluice
  context: {cluster: local, user: sluice}
current-context: sluice
`, o.Server, base64.StdEncoding.EncodeToString(ca), strings.TrimSpace(string(tok)))), nil
}
