package nettest

import (
	"encoding/json"
	"fmt"
	"os/exec"
	"sort"
	"testing"
	"time"
)

// IperfGbps reads the received throughput, in Gb/s, from iperf3 -J output.
func IperfGbps(out []byte) (float64, error) {
	var res struct {
		End struct {
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &res); err != nil {
		return 0, fmt.Errorf("iperf3 output: %w", err)
	}
	return res.End.SumReceived.BitsPerSecond / 1e9, nil
}

// Iperf runs a 3-second single-flow iperf3 from the namespace client to a
// server in the namespace server, at target, and returns the received
// throughput in Gb/s. It is for benchmarks: it waits a fixed moment for
// the server to listen.
func Iperf(b testing.TB, server, client, target string) float64 {
	b.Helper()
	srv := exec.Command("ip", "netns", "exec", server, "iperf3", "-s", "-1", "-p", "5299")
	if err := srv.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = srv.Process.Kill(); _ = srv.Wait() }()
	time.Sleep(300 * time.Millisecond)
	out, err := exec.Command("ip", "netns", "exec", client, "iperf3", "-c", target, "-p", "5299", "-t", "3", "-J").Output()
	if err != nil {
		b.Fatalf("iperf3 to %s: %v\n%s", target, err, out)
	}
	gbps, err := IperfGbps(out)
	if err != nil {
		b.Fatal(err)
	}
	return gbps
}

// Median returns the median of samples (the upper one of an even count).
func Median(samples []float64) float64 {
	s := append([]float64(nil), samples...)
	sort.Float64s(s)
	return s[len(s)/2]
}
