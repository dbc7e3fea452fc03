package wireguard

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// KeyFile is the node's private key in the agent's state directory.
const KeyFile = "wireguard.key"

// LoadOrCreateKey reads the node's private key from path, or makes and
// stores a new one when the file is missing, so the key is stable across
// restarts and deleting the file rotates it. The file is written with mode
// 0600 and replaced atomically, so a crash never leaves half a key.
// created reports a new key.
func LoadOrCreateKey(path string) (key wgtypes.Key, created bool, err error) {
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		k, perr := wgtypes.ParseKey(strings.TrimSpace(string(b)))
		if perr != nil {
			return wgtypes.Key{}, false, fmt.Errorf("WireGuard key file %s is not a base64 key (delete it to make a new one): %w", path, perr)
		}
		if err := keepPrivate(path); err != nil {
			return wgtypes.Key{}, false, err
		}
		return k, false, nil
	case errors.Is(err, os.ErrNotExist):
		k, err := writeNewKey(path)
		return k, err == nil, err
	default:
		return wgtypes.Key{}, false, fmt.Errorf("reading WireGuard key: %w", err)
	}
}

// RotateKey replaces the node's private key with a new one. A running
// agent picks it up at its next sync and republishes its public key.
func RotateKey(path string) (wgtypes.Key, error) {
	return writeNewKey(path)
}

func writeNewKey(path string) (wgtypes.Key, error) {
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("generating a WireGuard key: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return wgtypes.Key{}, fmt.Errorf("creating the key's directory: %w", err)
	}
	if err := writeSynced(path, []byte(k.String()+"\n")); err != nil {
		return wgtypes.Key{}, fmt.Errorf("writing WireGuard key: %w", err)
	}
	return k, nil
}

// writeSynced is an atomic replace that also reaches the disk before the
// rename: unlike the agent's other files, a key lost in a crash is not
// rebuilt from the cluster. os.CreateTemp makes the file 0600 from the
// start, so the key is never readable by others.
func writeSynced(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// keepPrivate narrows a key file that someone made readable by others.
func keepPrivate(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("reading WireGuard key: %w", err)
	}
	if fi.Mode().Perm()&0o077 == 0 {
		return nil
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return fmt.Errorf("making WireGuard key %s private: %w", path, err)
	}
	return nil
}
