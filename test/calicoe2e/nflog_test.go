package calicoe2e

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/policy"
)

// TestLogRuleFeedsTheDropStream: a Log rule logs the connection through
// NFLOG group 20 on the receiving node, which the agent reads into the same
// stream as its drops (sluicectl drops, verdict "logged", naming the
// policy), and lets the next rule decide; traffic the Log rule does not
// match (UDP) is not logged: the control.
func TestLogRuleFeedsTheDropStream(t *testing.T) {
	kubectlApply(t, `
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {namespace: x, name: log-then-allow}
spec:
  selector: pod == 'a'
  ingress: [{action: Log, protocol: TCP}, {action: Allow}]
`)
	logged := func(proto string) bool {
		for _, line := range strings.Split(shared.AgentGet(t, "node-1", "/drops?namespace=x&pod=a"), "\n") {
			var d policy.Drop
			if json.Unmarshal([]byte(line), &d) == nil && d.Verdict == "logged" && d.Protocol == proto &&
				strings.Contains(d.Policy, "log-then-allow") {
				return true
			}
		}
		return false
	}
	deadline := time.Now().Add(30 * time.Second)
	for !logged("TCP") && time.Now().Before(deadline) {
		if !reaches("x/b", "x/a") {
			t.Fatal("the Log rule stopped the connection")
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !logged("TCP") {
		t.Fatalf("no logged TCP record of log-then-allow in node-1's drop stream:\n%s", shared.AgentGet(t, "node-1", "/drops"))
	}
	place, _ := shared.Resolve("x/b")
	ip, _ := shared.ResolveTarget("x/a", false)
	if _, err := lab.Probe(place, ip, 80, true, 700*time.Millisecond); err != nil {
		t.Errorf("UDP to x/a: %v", err)
	}
	time.Sleep(time.Second)
	if logged("UDP") {
		t.Error("UDP was logged, but the Log rule matches TCP only")
	}
}
