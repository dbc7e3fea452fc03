package cni

import (
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

func TestInstallAndUninstall(t *testing.T) {
	src, bin, conf := t.TempDir(), t.TempDir(), t.TempDir()
	for _, p := range Plugins {
		os.WriteFile(filepath.Join(src, p), []byte("#!/bin/sh\necho "+p+"\n"), 0o755)
	}
	// The distribution already ships host-local: install updates it but
	// uninstall must leave it.
	os.WriteFile(filepath.Join(bin, "host-local"), []byte("old"), 0o755)
	os.WriteFile(filepath.Join(conf, "99-other.conflist"), []byte("{}"), 0o644)
	token, ca := filepath.Join(t.TempDir(), "token"), filepath.Join(t.TempDir(), "ca.crt")
	os.WriteFile(token, []byte("secret-token\n"), 0o600)
	os.WriteFile(ca, []byte("CA"), 0o644)

	written, err := Install(InstallOptions{SrcBinDir: src, BinDir: bin, ConfDir: conf, TokenFile: token, CAFile: ca, Server: "https://10.0.0.1:6443"})
	if err != nil {
		t.Fatal(err)
	}
	if len(written) != len(Plugins)+2 {
		t.Errorf("wrote %v", written)
	}
	for _, p := range Plugins {
		st, err := os.Stat(filepath.Join(bin, p))
		if err != nil || st.Mode().Perm() != 0o755 {
			t.Errorf("%s: %v %v", p, st, err)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(bin, "host-local")); string(b) == "old" {
		t.Error("host-local not updated")
	}
	kc, err := os.Stat(filepath.Join(conf, KubeconfigName))
	if err != nil || kc.Mode().Perm() != 0o600 {
		t.Errorf("kubeconfig: %v %v; want mode 0600", kc, err)
	}
	if b, _ := os.ReadFile(filepath.Join(conf, KubeconfigName)); !strings.Contains(string(b), "token: secret-token\n") || !strings.Contains(string(b), "https://10.0.0.1:6443") {
		t.Errorf("kubeconfig:\n%s", b)
	}
	if b, _ := os.ReadFile(filepath.Join(conf, ConflistName)); string(b) != DefaultConflist {
		t.Errorf("conflist:\n%s", b)
	}
	// No temporary files are left behind by the atomic writes.
	for _, d := range []string{bin, conf} {
		entries, _ := os.ReadDir(d)
		for _, e := range entries {
			if strings.Contains(e.Name(), ".tmp") {
				t.Errorf("temporary file left: %s", e.Name())
			}
		}
	}
	// Installing again (a DaemonSet restart) changes nothing uninstall sees.
	if _, err := Install(InstallOptions{SrcBinDir: src, BinDir: bin, ConfDir: conf, TokenFile: token, CAFile: ca, Server: "https://10.0.0.1:6443"}); err != nil {
		t.Fatal(err)
	}
	// The installer (an init container) sees the host's dirs at other
	// paths than the uninstaller: the record must not depend on them.
	seen := t.TempDir()
	for _, d := range []*string{&bin, &conf} {
		moved := filepath.Join(seen, filepath.Base(*d))
		if err := os.Rename(*d, moved); err != nil {
			t.Fatal(err)
		}
		*d = moved
	}
	removed, err := Uninstall(bin, conf)
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(removed)
	if len(removed) != len(Plugins)-1+2 {
		t.Errorf("removed %v", removed)
	}
	left := func(d string) []string {
		entries, _ := os.ReadDir(d)
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		return names
	}
	if got := left(bin); len(got) != 1 || got[0] != "host-local" {
		t.Errorf("bin dir after uninstall: %v; want only the pre-existing host-local", got)
	}
	if got := left(conf); len(got) != 1 || got[0] != "99-other.conflist" {
		t.Errorf("conf dir after uninstall: %v; want only the other network's file", got)
	}
}

func TestInstallRefusesBadConflist(t *testing.T) {
	_, err := Install(InstallOptions{SrcBinDir: t.TempDir(), BinDir: t.TempDir(), ConfDir: t.TempDir(), Conflist: "{nope"})
	if err == nil || !strings.Contains(err.Error(), "not valid JSON") {
		t.Errorf("bad conflist: %v", err)
	}
}

// TestRemoveState removes the plugin's records and host-local's
// reservations of the installed network, and nothing else under the state
// dir.
func TestRemoveState(t *testing.T) {
	conf, state := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(conf, ConflistName), []byte(`{"name":"pods","plugins":[]}`), 0o644)
	for _, d := range []string{"sluice", "networks/pods", "networks/other", "results"} {
		os.MkdirAll(filepath.Join(state, d), 0o755)
		os.WriteFile(filepath.Join(state, d, "10.244.1.2"), []byte("x"), 0o644)
	}
	network := InstalledNetwork(conf)
	if network != "pods" {
		t.Fatalf("network %q, want pods", network)
	}
	removed, err := RemoveState(state, network)
	if err != nil || len(removed) != 2 {
		t.Fatalf("removed %v, %v", removed, err)
	}
	for _, gone := range []string{"sluice", "networks/pods"} {
		if _, err := os.Stat(filepath.Join(state, gone)); !os.IsNotExist(err) {
			t.Errorf("%s survived: %v", gone, err)
		}
	}
	for _, kept := range []string{"networks/other/10.244.1.2", "results/10.244.1.2"} {
		if _, err := os.Stat(filepath.Join(state, kept)); err != nil {
			t.Errorf("%s is gone: %v", kept, err)
		}
	}
	if again, err := RemoveState(state, network); err != nil || len(again) != 0 {
		t.Errorf("second run: %v %v", again, err)
	}
	if _, err := RemoveState(state, "../.."); err == nil {
		t.Error("a path as network name was accepted")
	}
	os.WriteFile(filepath.Join(conf, ConflistName), []byte(`{"name":"../x"}`), 0o644)
	if n := InstalledNetwork(conf); n != "sluice" {
		t.Errorf("a conflist naming ../x gave network %q", n)
	}
}
