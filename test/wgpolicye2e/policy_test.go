// Package wgpolicye2e runs the policy truth tables (test/policye2e) on a
// lab whose overlay is the wireguard backend, so `make test` proves policy
// unchanged by encryption. It starts no lab of its own: it runs that
// package's tests with SLUICE_LAB_BACKEND=wireguard, after this package's
// lab-less turn in `go test ./...`.
package wgpolicye2e

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/sluice-net/sluice/test/labtest"
)

func TestPolicyTruthTablesOverWireGuard(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the policy lab tests again (about 90 s)")
	}
	if os.Getenv("SLUICE_LAB_BACKEND") != "" {
		t.Skip("SLUICE_LAB_BACKEND is set: the policy tests already run with that backend")
	}
	cmd := exec.Command("go", "test", "-v", "-count=1", "-p", "1", "-timeout", "20m", "./test/policye2e")
	cmd.Dir = labtest.RepoRoot()
	cmd.Env = append(os.Environ(), "SLUICE_LAB_BACKEND=wireguard")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the policy truth tables fail with the wireguard backend: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "labtest: overlay backend wireguard") {
		t.Fatalf("the policy lab did not run with the wireguard backend:\n%s", out)
	}
	passed := strings.Count(string(out), "--- PASS")
	if passed == 0 {
		t.Fatalf("no policy test passed:\n%s", out)
	}
	t.Logf("%d policy tests passed with the wireguard backend", passed)
}
