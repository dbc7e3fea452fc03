package cleanup

import (
	"github.com/sluice-net/sluice/overlay/wireguard"

	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Files the agent writes.
const (
	SubnetEnv    = "subnet.env"
	AgentSocket  = "sluiced.sock"
	EndpointsDir = "endpoints"
)

// Files removes the agent's files: subnet.env and the socket in runDir, the
// endpoint records in stateDir. It removes only names the agent writes (and
// their temporary files), never a whole tree, so a mistaken --run-dir such
// as /run loses nothing else. The directories go too when that leaves them
// empty; a directory that is a mount point (the DaemonSet's hostPath) stays.
func Files(runDir, stateDir string) ([]string, error) {
	var removed []string
	var errs []error
	rm := func(path string) {
		err := os.Remove(path)
		switch {
		case err == nil:
			removed = append(removed, "file "+path)
		case errors.Is(err, os.ErrNotExist):
		case errors.Is(err, syscall.ENOTEMPTY), errors.Is(err, syscall.EEXIST), errors.Is(err, syscall.EBUSY):
			// Someone else's files, or a mount point: leave it.
		default:
			errs = append(errs, err)
		}
	}
	for _, name := range []string{SubnetEnv, AgentSocket} {
		rm(filepath.Join(runDir, name))
		temps, _ := filepath.Glob(filepath.Join(runDir, "."+name+".tmp*"))
		for _, t := range temps {
			rm(t)
		}
	}
	rm(runDir)
	rm(filepath.Join(stateDir, wireguard.KeyFile))
	eps := filepath.Join(stateDir, EndpointsDir)
	entries, err := os.ReadDir(eps)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("reading %s: %w", eps, err))
	}
	for _, e := range entries {
		// Records are <containerID>_<ifName>.json, written atomically.
		if !e.IsDir() && (strings.HasSuffix(e.Name(), ".json") || strings.Contains(e.Name(), ".json.tmp")) {
			rm(filepath.Join(eps, e.Name()))
		}
	}
	rm(eps)
	rm(stateDir)
	return removed, errors.Join(errs...)
}
