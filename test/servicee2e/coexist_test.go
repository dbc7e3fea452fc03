package servicee2e

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// coexistIPTables: in kube-proxy's iptables mode, FORWARD holds Sluice's
// decision first, kube-proxy's jumps after it and Sluice's accept last;
// Sluice never touches kube-proxy's 0x4000 and 0x8000 mark bits; and a
// kube-proxy sync starts no reordering war.
func (c *cluster) coexistIPTables(t *testing.T, backend string) {
	save := c.iptablesSave(t, "node-1", backend)
	for _, chain := range []string{":KUBE-SERVICES", ":KUBE-PROXY-CANARY", ":KUBE-FORWARD", ":SLUICE-FORWARD", ":SLUICE-FORWARD-ACCEPT"} {
		if !slices.ContainsFunc(save, func(l string) bool { return l == chain || strings.HasPrefix(l, chain+" ") }) {
			t.Errorf("iptables-%s on node-1 lacks chain %s", backend, chain[1:])
		}
	}
	fwd := linesWith(save, "-A FORWARD ")
	if len(fwd) < 3 || !strings.HasSuffix(fwd[0], "-j SLUICE-FORWARD") || !strings.HasSuffix(fwd[len(fwd)-1], "-j SLUICE-FORWARD-ACCEPT") {
		t.Errorf("FORWARD is not decision first, accept last:\n%s", strings.Join(fwd, "\n"))
	}
	if !slices.ContainsFunc(fwd, func(l string) bool { return strings.HasSuffix(l, "-j KUBE-FORWARD") }) {
		t.Errorf("FORWARD lacks kube-proxy's jump:\n%s", strings.Join(fwd, "\n"))
	}
	// Sluice reads kube-proxy's masquerade bit (its own masquerade leaves
	// those packets to kube-proxy) and never sets either bit.
	for _, l := range linesWith(save, "SLUICE") {
		if strings.Contains(l, "-j MARK") && (strings.Contains(l, "0x4000") || strings.Contains(l, "0x8000")) {
			t.Errorf("a Sluice rule sets kube-proxy's mark bits: %s", l)
		}
	}
	if len(linesWith(linesWith(save, "-A SLUICE-POSTROUTING "), "--mark 0x4000/0x4000")) == 0 {
		t.Errorf("Sluice's masquerade does not leave kube-proxy's marked packets to kube-proxy:\n%s", strings.Join(linesWith(save, "SLUICE-POSTROUTING"), "\n"))
	}
	// A Service change makes kube-proxy sync; Sluice's resync runs too.
	// Neither moves the other's rules, and Sluice repairs nothing.
	repairs := c.hookRepairs(t, "node-1")
	order := func() []string {
		return linesWith(c.iptablesSave(t, "node-1", backend), "-A FORWARD ", "-A PREROUTING ", "-A POSTROUTING ", "-A INPUT ", "-A OUTPUT ")
	}
	before := order()
	ctx := ctxT(t, time.Minute)
	s := service("sync-trigger", "web", corev1.ServiceTypeClusterIP, 0, "")
	if _, err := c.Client.CoreV1().Services(ns).Create(ctx, s, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	defer c.Client.CoreV1().Services(ns).Delete(context.Background(), s.Name, metav1.DeleteOptions{})
	if !labtest.Eventually(30*time.Second, func() bool {
		return len(linesWith(c.iptablesSave(t, "node-1", backend), ns+"/sync-trigger")) > 0
	}) {
		t.Fatal("kube-proxy never programmed the new Service")
	}
	time.Sleep(12 * time.Second) // past Sluice's periodic re-read
	if after := order(); !slices.Equal(before, after) {
		t.Errorf("the built-in chains changed across a kube-proxy sync:\nbefore:\n%s\nafter:\n%s", strings.Join(before, "\n"), strings.Join(after, "\n"))
	}
	if now := c.hookRepairs(t, "node-1"); now != repairs {
		t.Errorf("Sluice repaired its hooks %d times across a kube-proxy sync", now-repairs)
	}
}

// coexistNFTables: in nftables mode kube-proxy writes no iptables rules;
// Sluice still decides first in FORWARD, and its backend detection
// follows the kubelet's hint, not the empty tables.
func (c *cluster) coexistNFTables(t *testing.T) {
	save := c.iptablesSave(t, "node-1", "nft")
	for _, l := range save {
		for _, kube := range []string{":KUBE-SERVICES", ":KUBE-PROXY-CANARY", ":KUBE-FORWARD", ":KUBE-NODEPORTS"} {
			if strings.HasPrefix(l, kube+" ") || l == kube {
				t.Errorf("kube-proxy in nftables mode left an iptables chain: %s", l)
			}
		}
	}
	fwd := linesWith(save, "-A FORWARD ")
	if len(fwd) != 2 || !strings.HasSuffix(fwd[0], "-j SLUICE-FORWARD") || !strings.HasSuffix(fwd[1], "-j SLUICE-FORWARD-ACCEPT") {
		t.Errorf("FORWARD:\n%s", strings.Join(fwd, "\n"))
	}
	if table := c.kubeProxyNFT(t, "node-1"); !strings.Contains(table, "chain services") {
		t.Errorf("kube-proxy's nftables table has no services chain:\n%s", table)
	}
	if legacy := linesWith(c.iptablesSave(t, "node-1", "legacy"), "SLUICE"); len(legacy) > 0 {
		t.Errorf("Sluice wrote to iptables-legacy: %v", legacy)
	}
	logs := c.agentLogs(t)
	if !strings.Contains(logs, `"iptables backend detected" mode="nft" reason="the kubelet's KUBE-IPTABLES-HINT is in iptables-nft"`) {
		t.Errorf("the agents did not follow the kubelet's hint:\n%s", grep(logs, "iptables backend"))
	}
}

// legacyDetection: on a legacy node Sluice writes to iptables-legacy,
// beside kube-proxy's rules, and nothing to iptables-nft.
func (c *cluster) legacyDetection(t *testing.T) {
	logs := c.agentLogs(t)
	if !strings.Contains(logs, `"iptables backend detected" mode="legacy"`) {
		t.Errorf("the agents did not pick iptables-legacy:\n%s", grep(logs, "iptables backend"))
	}
	legacy := c.iptablesSave(t, "node-1", "legacy")
	for _, chain := range []string{":SLUICE-FORWARD", ":KUBE-SERVICES", ":KUBE-IPTABLES-HINT"} {
		if len(linesWith(legacy, chain+" ")) == 0 {
			t.Errorf("iptables-legacy on node-1 lacks %s", chain[1:])
		}
	}
	if nft := linesWith(c.iptablesSave(t, "node-1", "nft"), "SLUICE", "KUBE-SERVICES"); len(nft) > 0 {
		t.Errorf("iptables-nft on a legacy node holds: %v", nft)
	}
}

func grep(s, word string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, word) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

var policyHookRepairs = regexp.MustCompile(`(?m)^sluice_drift_repairs_total\{kind="policy-hook"\} (\d+)`)

// hookRepairs reads the agent's count of policy hook repairs.
func (c *cluster) hookRepairs(t *testing.T, node string) int {
	t.Helper()
	out, err := c.Exec(node, "curl", "-s", "-m", "2", "http://127.0.0.1:9098/metrics")
	if err != nil {
		t.Fatal(err)
	}
	if m := policyHookRepairs.FindStringSubmatch(out); m != nil {
		n, _ := strconv.Atoi(m[1])
		return n
	}
	return 0
}

// restartsKeepConnections: an established connection through a ClusterIP,
// to a pod that policy isolates, survives a restart of every kube-proxy
// and then of every Sluice agent: every request on it is answered. A
// kube-proxy restart leaves Sluice's rules exactly as they were.
func (c *cluster) restartsKeepConnections(t *testing.T, backend string) {
	defer c.deletePolicies(t, ns, "web-from-clients")
	c.applyPolicy(t, ingressFrom("web-from-clients", "web", podPeer("role", "client")))
	// Programmed once other is denied: only then are Sluice's rules at rest.
	c.expect(t, "svc/other", c.svc("web"), false)
	c.expect(t, "svc/client", c.svc("web"), true)
	conn := c.keepAlive(t, "svc/client", c.svc("web"))
	defer conn.stop(t)

	sluiceRules := func() []string {
		var out []string
		for _, n := range c.Nodes {
			out = append(out, linesWith(c.iptablesSave(t, n.Name, backend), "SLUICE")...)
		}
		return out
	}
	before := sluiceRules()
	c.restartDaemonSet(t, lab.KubeProxyDaemonSet, "k8s-app=kube-proxy")
	time.Sleep(3 * time.Second) // kube-proxy's first full sync
	if after := sluiceRules(); !slices.Equal(before, after) {
		t.Errorf("a kube-proxy restart changed Sluice's rules:\nbefore:\n%s\nafter:\n%s", strings.Join(before, "\n"), strings.Join(after, "\n"))
	}
	c.restartDaemonSet(t, lab.AgentDaemonSet, "app.kubernetes.io/name=sluice")
	time.Sleep(2 * time.Second)
	if n := conn.stop(t); n < 20 {
		t.Errorf("only %d requests went over the connection", n)
	}
}

type keepAliveConn struct {
	done     chan struct{}
	wg       sync.WaitGroup
	once     sync.Once
	mu       sync.Mutex
	requests int64
	err      error
}

// keepAlive opens one TCP connection and sends an HTTP request on it every
// 100 ms until stopped; the first failure ends it.
func (c *cluster) keepAlive(t *testing.T, from, target string) *keepAliveConn {
	place, err := c.Resolve(from)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := place.Dial("tcp", target, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	k := &keepAliveConn{done: make(chan struct{})}
	k.wg.Add(1)
	go func() {
		defer k.wg.Done()
		defer nc.Close()
		r := bufio.NewReader(nc)
		for {
			select {
			case <-k.done:
				return
			case <-time.After(100 * time.Millisecond):
			}
			err := roundTrip(nc, r, target)
			k.mu.Lock()
			if err != nil {
				k.err = fmt.Errorf("request %d on the connection: %w", k.requests+1, err)
			} else {
				k.requests++
			}
			k.mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	return k
}

func roundTrip(nc net.Conn, r *bufio.Reader, host string) error {
	_ = nc.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := fmt.Fprintf(nc, "GET /hostname HTTP/1.1\r\nHost: %s\r\n\r\n", host); err != nil {
		return err
	}
	resp, err := http.ReadResponse(r, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %s", resp.Status)
	}
	return nil
}

// stop ends the requests, fails the test if one failed, and returns how
// many were answered.
func (k *keepAliveConn) stop(t *testing.T) int64 {
	t.Helper()
	k.once.Do(func() { close(k.done) })
	k.wg.Wait()
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.err != nil {
		t.Errorf("the established connection broke: %v", k.err)
		k.err = nil
	}
	return k.requests
}
