// Package servicee2e runs Sluice beside kube-proxy and CoreDNS on real
// nodes, as a kubeadm cluster runs them, and proves that NetworkPolicy
// holds for Service traffic: ClusterIP, NodePort (from pods and from the
// outside world, with both externalTrafficPolicy values) and the hairpin,
// in kube-proxy's iptables and nftables modes and with an iptables-legacy
// kube-proxy; the DNS recipe under default-deny egress; that Sluice's and
// kube-proxy's rules coexist (order, marks, restarts, cleanup).
//
// The labs are IPv4 single-stack: kube-proxy's handling of each family is
// the same, and the dual-stack policy truth tables run elsewhere.
package servicee2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/sluice-net/sluice/test/labtest"
)

func TestMain(m *testing.M) {
	if reason := missing(); reason != "" {
		fmt.Println("servicee2e: skipped:", reason)
		os.Exit(0)
	}
	labtest.Run(m)
}

// missing says why real nodes cannot run on this machine, or "".
func missing() string {
	if os.Geteuid() != 0 {
		return "real nodes need root (network and mount namespaces, cgroups)"
	}
	for _, c := range []string{"containerd", "runc", "ctr", "nsenter", "nft", "iptables-legacy"} {
		if _, err := exec.LookPath(c); err != nil {
			return c + " is not installed (make deps installs it)"
		}
	}
	return ""
}

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
