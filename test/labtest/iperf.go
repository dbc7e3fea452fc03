package labtest

import (
	"os/exec"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/nettest"
)

// Commander runs a command somewhere: a lab Place, or a plain namespace.
type Commander interface {
	Command(argv ...string) *exec.Cmd
}

// Iperf runs an iperf3 server at one place and a 3-second single-flow
// client at another, and returns the received throughput in Gb/s.
func Iperf(b *testing.B, server, client Commander, target string) float64 {
	b.Helper()
	srv := server.Command("iperf3", "-s", "-1", "-p", "5299")
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
	time.Sleep(300 * time.Millisecond)
	out, err := client.Command("iperf3", "-c", target, "-p", "5299", "-t", "3", "-J").Output()
	if err != nil {
		b.Fatalf("iperf3 to %s: %v\n%s", target, err, out)
	}
	gbps, err := nettest.IperfGbps(out)
	if err != nil {
		b.Fatal(err)
	}
	return gbps
}
