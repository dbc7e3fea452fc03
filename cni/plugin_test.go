package cni_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/sluice-net/sluice/cni/endpointapi"
	"github.com/sluice-net/sluice/internal/endpoints"
	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/internal/metrics"
	"github.com/sluice-net/sluice/internal/nettest"
	"github.com/sluice-net/sluice/test/labtest"
)

// host is a node-like namespace with an uplink and a default route (proxy
// ARP answers for the pods' gateway only when the host has a route to it),
// a CNI bin dir with sluice and the reference plugins, subnet.env, and a
// real endpoint registry of sluiced on a socket.
type host struct {
	t         testing.TB
	netns     ns.NetNS
	dir       string
	binDir    string
	socket    string
	registry  *endpoints.Registry
	stopAgent context.CancelFunc
	cni       *libcni.CNIConfig
	hostLocal string
}

func newHost(t testing.TB) *host {
	t.Helper()
	bins, err := labtest.Binaries()
	if err != nil {
		t.Fatal(err)
	}
	h := &host{t: t, netns: nettest.NewNS(t), dir: t.TempDir()}
	h.binDir = filepath.Join(h.dir, "bin")
	os.MkdirAll(h.binDir, 0o755)
	copyFile(t, filepath.Join(bins, "sluice"), filepath.Join(h.binDir, "sluice"))
	for _, p := range []string{"host-local", "ptp", "loopback", "portmap"} {
		copyFile(t, filepath.Join(lab.CNIToolsPath(lab.DefaultToolsDir()), p), filepath.Join(h.binDir, p))
	}
	name := nettest.Name(h.netns)
	nettest.Run(t, "ip", "-n", name, "link", "add", "up0", "type", "veth", "peer", "name", "up1")
	nettest.Run(t, "ip", "-n", name, "addr", "add", "192.0.2.1/24", "dev", "up0")
	nettest.Run(t, "ip", "-n", name, "addr", "add", "2001:db8::1/64", "dev", "up0", "nodad")
	nettest.Run(t, "ip", "-n", name, "link", "set", "up0", "up")
	nettest.Run(t, "ip", "-n", name, "link", "set", "up1", "up")
	nettest.Run(t, "ip", "-n", name, "route", "add", "default", "via", "192.0.2.2")
	nettest.Run(t, "ip", "-n", name, "-6", "route", "add", "default", "via", "2001:db8::2")
	os.WriteFile(filepath.Join(h.dir, "subnet.env"), []byte("SLUICE_NETWORK=10.244.0.0/16\nSLUICE_SUBNET=10.244.7.0/24\n"+
		"SLUICE_IPV6_NETWORK=fd00:10:244::/56\nSLUICE_IPV6_SUBNET=fd00:10:244:7::/64\nSLUICE_MTU=1450\nSLUICE_IPMASQ=true\n"), 0o644)
	h.socket = filepath.Join(h.dir, "sluiced.sock")
	h.hostLocal = filepath.Join(h.dir, "host-local")
	h.cni = libcni.NewCNIConfigWithCacheDir([]string{h.binDir}, filepath.Join(h.dir, "cache"), nil)
	h.startAgent()
	t.Cleanup(func() { h.stopAgentNow() })
	return h
}

func copyFile(t testing.TB, src, dst string) {
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatalf("%v (run 'make tools')", err)
	}
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
}

func (h *host) startAgent() {
	var err error
	// The registry checks veths in the host namespace at start.
	nettest.Do(h.t, h.netns, func() error {
		h.registry, err = endpoints.NewRegistry(filepath.Join(h.dir, "endpoints"), nil, nil)
		return err
	})
	ctx, cancel := context.WithCancel(context.Background())
	h.stopAgent = cancel
	go h.registry.Serve(ctx, h.socket)
	for i := 0; i < 100; i++ {
		if _, err := os.Stat(h.socket); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (h *host) stopAgentNow() {
	if h.stopAgent != nil {
		h.stopAgent()
		h.stopAgent = nil
		os.Remove(h.socket)
	}
}

func (h *host) conflist(version string) *libcni.NetworkConfigList {
	h.t.Helper()
	js := fmt.Sprintf(`{"cniVersion":%q,"name":"sluice-test","plugins":[{"type":"sluice","subnetFile":%q,"agentSocket":%q,"dataDir":%q,"agentTimeout":"3s",
		"ipam":{"type":"host-local","subnet":"usePodCidr","dataDir":%q}}]}`,
		version, filepath.Join(h.dir, "subnet.env"), h.socket, filepath.Join(h.dir, "sluice-data"), h.hostLocal)
	l, err := libcni.ConfListFromBytes([]byte(js))
	if err != nil {
		h.t.Fatal(err)
	}
	return l
}

func rt(id, netns string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: id, NetNS: netns, IfName: "eth0", Args: [][2]string{
		{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "test"}, {"K8S_POD_NAME", "pod-" + id}, {"K8S_POD_INFRA_CONTAINER_ID", id}}}
}

// in runs fn in the host namespace, where the runtime calls plugins.
func (h *host) in(fn func() error) error {
	return h.netns.Do(func(ns.NetNS) error { return fn() })
}

func (h *host) add(list *libcni.NetworkConfigList, r *libcni.RuntimeConf) (*current.Result, error) {
	var res types.Result
	err := h.in(func() error {
		var err error
		res, err = h.cni.AddNetworkList(context.Background(), list, r)
		return err
	})
	if err != nil {
		return nil, err
	}
	return current.NewResultFromResult(res)
}

func (h *host) del(list *libcni.NetworkConfigList, r *libcni.RuntimeConf) error {
	return h.in(func() error { return h.cni.DelNetworkList(context.Background(), list, r) })
}

func (h *host) check(list *libcni.NetworkConfigList, r *libcni.RuntimeConf) error {
	return h.in(func() error { return h.cni.CheckNetworkList(context.Background(), list, r) })
}

// reservations lists host-local's reserved IPs.
func (h *host) reservations() []string {
	entries, _ := os.ReadDir(filepath.Join(h.hostLocal, "sluice-test"))
	var ips []string
	for _, e := range entries {
		if net.ParseIP(e.Name()) != nil {
			ips = append(ips, e.Name())
		}
	}
	return ips
}

func (h *host) slLinks() []string {
	out := nettest.Run(h.t, "ip", "-n", nettest.Name(h.netns), "-o", "link", "show")
	var names []string
	for _, l := range strings.Split(out, "\n") {
		f := strings.Fields(l)
		if len(f) > 1 && strings.HasPrefix(f[1], "sl") {
			names = append(names, f[1])
		}
	}
	return names
}

// connect opens TCP from one namespace to an address served in another.
func connect(t *testing.T, from ns.NetNS, server ns.NetNS, addr string) error {
	var ln net.Listener
	if err := server.Do(func(ns.NetNS) error {
		var err error
		ln, err = net.Listen("tcp", net.JoinHostPort(addr, "0"))
		return err
	}); err != nil {
		return err
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
		}
	}()
	return from.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", ln.Addr().String(), 2*time.Second)
		if err == nil {
			c.Close()
		}
		return err
	})
}

func cniCode(err error) uint {
	var e *types.Error
	if errors.As(err, &e) {
		return e.Code
	}
	return 0
}

func TestAddCheckDelEveryVersion(t *testing.T) {
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			h := newHost(t)
			pod := nettest.NewNS(t)
			list := h.conflist(v)
			r := rt("c1", pod.Path())
			res, err := h.add(list, r)
			if err != nil {
				t.Fatal(err)
			}
			if len(res.IPs) != 2 || !strings.HasPrefix(res.IPs[0].Address.String(), "10.244.7.") || !strings.HasPrefix(res.IPs[1].Address.String(), "fd00:10:244:7::") {
				t.Fatalf("IPs = %v", res.IPs)
			}
			if links := h.slLinks(); len(links) != 1 || len(links[0]) != len("sl")+11+1 { // "slXXXXXXXXXXX@if2:" trimmed below
				if len(links) != 1 || !strings.HasPrefix(links[0], "sl") {
					t.Errorf("host veths: %v", links)
				}
			}
			podOut := nettest.Run(t, "ip", "-n", nettest.Name(pod), "addr", "show", "eth0")
			if !strings.Contains(podOut, res.IPs[0].Address.IP.String()+"/32") || !strings.Contains(podOut, "mtu 1450") {
				t.Errorf("pod eth0:\n%s", podOut)
			}
			// Host to pod and pod to host (through the proxy-ARP gateway),
			// in both families.
			for _, ipc := range res.IPs {
				if err := connect(t, h.netns, pod, ipc.Address.IP.String()); err != nil {
					t.Errorf("host -> pod %s: %v", ipc.Address.IP, err)
				}
			}
			for _, hostIP := range []string{"192.0.2.1", "2001:db8::1"} {
				if err := connect(t, pod, h.netns, hostIP); err != nil {
					t.Errorf("pod -> host %s: %v", hostIP, err)
				}
			}
			if len(h.registry.List()) != 1 {
				t.Errorf("agent knows %d endpoints, want 1", len(h.registry.List()))
			}
			if v != "0.3.1" {
				if err := h.check(list, r); err != nil {
					t.Errorf("CHECK of a healthy pod: %v", err)
				}
			}
			if err := h.del(list, r); err != nil {
				t.Fatal(err)
			}
			if err := h.del(list, r); err != nil {
				t.Errorf("second DEL: %v", err)
			}
			if left := h.reservations(); len(left) != 0 {
				t.Errorf("IPs left reserved: %v", left)
			}
			if left := h.slLinks(); len(left) != 0 {
				t.Errorf("veths left: %v", left)
			}
			if routes := nettest.Run(t, "ip", "-n", nettest.Name(h.netns), "route"); strings.Contains(routes, "10.244.7.") {
				t.Errorf("routes left:\n%s", routes)
			}
			if len(h.registry.List()) != 0 {
				t.Error("the agent still lists the endpoint")
			}
		})
	}
}

func TestCheckReportsDrift(t *testing.T) {
	h := newHost(t)
	pod := nettest.NewNS(t)
	list, r := h.conflist("1.0.0"), rt("c1", pod.Path())
	res, err := h.add(list, r)
	if err != nil {
		t.Fatal(err)
	}
	nettest.Run(t, "ip", "-n", nettest.Name(h.netns), "route", "del", res.IPs[0].Address.IP.String()+"/32")
	err = h.check(list, r)
	if err == nil || !strings.Contains(err.Error(), "host route to "+res.IPs[0].Address.IP.String()) {
		t.Errorf("CHECK after deleting the host route: %v", err)
	}
	nettest.Run(t, "ip", "-n", nettest.Name(pod), "route", "del", "default")
	if err := h.check(list, r); err == nil || !strings.Contains(err.Error(), "default route via 169.254.1.1") {
		t.Errorf("CHECK after deleting the pod's default route: %v", err)
	}
	_ = h.del(list, r)
}

func TestAgentDownMeansTryAgain(t *testing.T) {
	h := newHost(t)
	pod := nettest.NewNS(t)
	list, r := h.conflist("1.0.0"), rt("c1", pod.Path())
	h.stopAgentNow()
	_, err := h.add(list, r)
	if cniCode(err) != types.ErrTryAgainLater {
		t.Fatalf("ADD with the agent down: %v; want CNI error 11", err)
	}
	if left := h.reservations(); len(left) != 0 {
		t.Errorf("a refused ADD reserved %v", left)
	}
	if left := h.slLinks(); len(left) != 0 {
		t.Errorf("a refused ADD left veths %v", left)
	}
	if err := h.in(func() error { return h.cni.GetStatusNetworkList(context.Background(), h.conflist("1.1.0")) }); cniCode(err) != types.ErrPluginNotAvailable {
		t.Errorf("STATUS with the agent down: %v; want code 50", err)
	}
	h.startAgent()
	if _, err := h.add(list, r); err != nil {
		t.Fatalf("ADD once the agent is back: %v", err)
	}
	if err := h.in(func() error { return h.cni.GetStatusNetworkList(context.Background(), h.conflist("1.1.0")) }); err != nil {
		t.Errorf("STATUS: %v", err)
	}
	_ = h.del(list, r)
}

func TestGCReleasesStaleAllocations(t *testing.T) {
	h := newHost(t)
	list := h.conflist("1.1.0")
	var rts []*libcni.RuntimeConf
	for i := 0; i < 3; i++ {
		pod := nettest.NewNS(t)
		r := rt(fmt.Sprintf("c%d", i), pod.Path())
		if _, err := h.add(list, r); err != nil {
			t.Fatal(err)
		}
		rts = append(rts, r)
	}
	if n := len(h.reservations()); n != 6 {
		t.Fatalf("%d reservations, want 6", n)
	}
	err := h.in(func() error {
		return h.cni.GCNetworkList(context.Background(), list, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: "c0", IfName: "eth0"}}})
	})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(h.reservations()); n != 2 {
		t.Errorf("%d reservations after GC, want the 2 of c0", n)
	}
	for _, r := range rts {
		_ = h.del(list, r)
	}
}

// TestNoLeakOverManyCycles: 1,000 ADD/DEL cycles leave no IP, veth or
// route behind.
func TestNoLeakOverManyCycles(t *testing.T) {
	h := newHost(t)
	pod := nettest.NewNS(t)
	list := h.conflist("1.0.0")
	for i := 0; i < 1000; i++ {
		r := rt(fmt.Sprintf("cycle-%d", i), pod.Path())
		if _, err := h.add(list, r); err != nil {
			t.Fatalf("cycle %d ADD: %v", i, err)
		}
		if err := h.del(list, r); err != nil {
			t.Fatalf("cycle %d DEL: %v", i, err)
		}
	}
	if left := h.reservations(); len(left) != 0 {
		t.Errorf("IPs leaked: %v", left)
	}
	if left := h.slLinks(); len(left) != 0 {
		t.Errorf("veths leaked: %v", left)
	}
	if routes := nettest.Run(t, "ip", "-n", nettest.Name(h.netns), "route"); strings.Contains(routes, "10.244.7.") {
		t.Errorf("routes leaked:\n%s", routes)
	}
	if entries, _ := os.ReadDir(filepath.Join(h.dir, "sluice-data")); len(entries) != 0 {
		t.Errorf("%d IPAM records leaked", len(entries))
	}
}

// BenchmarkAdd measures ADD latency of sluice (with the agent hand-off)
// against the reference ptp + host-local chain, in the same run.
func BenchmarkAdd(b *testing.B) {
	h := newHost(b)
	pod := nettest.NewNS(b)
	ptp, err := libcni.ConfListFromBytes([]byte(fmt.Sprintf(`{"cniVersion":"1.0.0","name":"ptp-bench","plugins":[{"type":"ptp","mtu":1450,
		"ipam":{"type":"host-local","ranges":[[{"subnet":"10.99.0.0/16"}]],"dataDir":%q}}]}`, filepath.Join(h.dir, "hl-ptp"))))
	if err != nil {
		b.Fatal(err)
	}
	sl, err := libcni.ConfListFromBytes([]byte(fmt.Sprintf(`{"cniVersion":"1.0.0","name":"sluice-bench","plugins":[{"type":"sluice","subnetFile":%q,"agentSocket":%q,"dataDir":%q,
		"ipam":{"type":"host-local","ranges":[[{"subnet":"usePodCidr"}]],"dataDir":%q}}]}`,
		filepath.Join(h.dir, "subnet.env"), h.socket, filepath.Join(h.dir, "sluice-data"), h.hostLocal)))
	if err != nil {
		b.Fatal(err)
	}
	measure := func(list *libcni.NetworkConfigList, i int) time.Duration {
		r := rt(fmt.Sprintf("b%d", i), pod.Path())
		start := time.Now()
		if _, err := h.add(list, r); err != nil {
			b.Fatal(err)
		}
		d := time.Since(start)
		if err := h.del(list, r); err != nil {
			b.Fatal(err)
		}
		return d
	}
	const samples = 50
	var ref, ours []time.Duration
	for i := 0; i < b.N; i++ {
		for j := 0; j < samples; j++ {
			ref = append(ref, measure(ptp, j))
			ours = append(ours, measure(sl, j))
		}
	}
	pct := func(d []time.Duration, p int) float64 {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return float64(d[len(d)*p/100].Microseconds()) / 1000
	}
	b.ReportMetric(pct(ref, 50), "ptp-p50-ms")
	b.ReportMetric(pct(ref, 99), "ptp-p99-ms")
	b.ReportMetric(pct(ours, 50), "sluice-p50-ms")
	b.ReportMetric(pct(ours, 99), "sluice-p99-ms")
	// The hand-off to the agent is the wait the policy loop will extend;
	// measure its round trip alone to report the plugin's own cost.
	client := endpointapi.NewClient(h.socket)
	var handoff []time.Duration
	for j := 0; j < samples*b.N; j++ {
		ep := endpointapi.Endpoint{ContainerID: fmt.Sprintf("h%d", j), IfName: "eth0", HostVeth: "up0", IPs: []string{"10.244.7.200"}}
		start := time.Now()
		if err := client.Register(context.Background(), ep); err != nil {
			b.Fatal(err)
		}
		handoff = append(handoff, time.Since(start))
		_ = client.Unregister(context.Background(), ep.ContainerID, "eth0")
	}
	b.ReportMetric(pct(ours, 50)/pct(ref, 50), "p50-ratio")
	b.ReportMetric(pct(handoff, 50), "handoff-p50-ms")
	b.ReportMetric((pct(ours, 50)-pct(handoff, 50))/pct(ref, 50), "p50-ratio-before-handoff")
}

// counter reads one of the agent's CNI counters.
func counter(vec *prometheus.CounterVec, labels ...string) float64 {
	return testutil.ToFloat64(vec.WithLabelValues(labels...))
}

// TestVerbsAreCountedByTheAgent drives every verb through the plugin
// binary and reads the counts back from the agent's registry, which served
// the plugin's reports over its socket.
func TestVerbsAreCountedByTheAgent(t *testing.T) {
	h := newHost(t)
	pod := nettest.NewNS(t)
	list, r := h.conflist("1.1.0"), rt("c1", pod.Path())
	before := map[string]float64{}
	for _, v := range endpointapi.Verbs {
		before[v+"/ok"] = counter(metrics.CNIRequests, v, "ok")
		before[v+"/error"] = counter(metrics.CNIRequests, v, "error")
	}
	delta := func(verb, result string) float64 {
		return counter(metrics.CNIRequests, verb, result) - before[verb+"/"+result]
	}
	checkDrift0 := counter(metrics.CNIErrors, "CHECK", "999")
	statusDown0 := counter(metrics.CNIErrors, "STATUS", "50")

	res, err := h.add(list, r)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.check(list, r); err != nil {
		t.Fatal(err)
	}
	// A drifted pod makes CHECK fail with CNI error 999.
	nettest.Run(t, "ip", "-n", nettest.Name(h.netns), "route", "del", res.IPs[0].Address.IP.String()+"/32")
	if err := h.check(list, r); cniCode(err) != types.ErrInternal {
		t.Fatalf("CHECK of a drifted pod: %v; want CNI error 999", err)
	}
	if err := h.in(func() error { return h.cni.GetStatusNetworkList(context.Background(), list) }); err != nil {
		t.Fatal(err)
	}
	if err := h.in(func() error {
		return h.cni.GCNetworkList(context.Background(), list, &libcni.GCArgs{ValidAttachments: []types.GCAttachment{{ContainerID: "c1", IfName: "eth0"}}})
	}); err != nil {
		t.Fatal(err)
	}
	if err := h.del(list, r); err != nil {
		t.Fatal(err)
	}
	// STATUS without subnet.env fails with CNI error 50, and says so.
	os.Rename(filepath.Join(h.dir, "subnet.env"), filepath.Join(h.dir, "subnet.env.off"))
	if err := h.in(func() error { return h.cni.GetStatusNetworkList(context.Background(), list) }); cniCode(err) != types.ErrPluginNotAvailable {
		t.Fatalf("STATUS without subnet.env: %v; want CNI error 50", err)
	}
	os.Rename(filepath.Join(h.dir, "subnet.env.off"), filepath.Join(h.dir, "subnet.env"))

	want := map[string]float64{"ADD/ok": 1, "ADD/error": 0, "CHECK/ok": 1, "CHECK/error": 1, "STATUS/ok": 1, "STATUS/error": 1,
		"GC/ok": 1, "GC/error": 0, "DEL/ok": 1, "DEL/error": 0}
	for k, n := range want {
		verb, result, _ := strings.Cut(k, "/")
		if got := delta(verb, result); got != n {
			t.Errorf("sluice_cni_requests_total{verb=%q,result=%q} grew by %v, want %v", verb, result, got, n)
		}
	}
	if got := counter(metrics.CNIErrors, "CHECK", "999") - checkDrift0; got != 1 {
		t.Errorf("sluice_cni_errors_total{verb=CHECK,code=999} grew by %v, want 1", got)
	}
	if got := counter(metrics.CNIErrors, "STATUS", "50") - statusDown0; got != 1 {
		t.Errorf("sluice_cni_errors_total{verb=STATUS,code=50} grew by %v, want 1", got)
	}

	// With the agent gone, the report finds no socket: DEL still succeeds
	// and nothing is counted.
	h.stopAgentNow()
	delOK := counter(metrics.CNIRequests, "DEL", "ok")
	if err := h.del(list, r); err != nil {
		t.Errorf("DEL with the agent down: %v", err)
	}
	if got := counter(metrics.CNIRequests, "DEL", "ok"); got != delOK {
		t.Errorf("a DEL with the agent down was counted")
	}
}

// TestReportRefusesUnknownVerbs: the verb is a label value, so the agent
// accepts only CNI's verbs.
func TestReportRefusesUnknownVerbs(t *testing.T) {
	h := newHost(t)
	c := endpointapi.NewClient(h.socket)
	if err := c.Report(context.Background(), endpointapi.Outcome{Verb: "VERSION"}); err == nil || !strings.Contains(err.Error(), "unknown CNI verb") {
		t.Errorf("report of verb VERSION: %v; want a refusal", err)
	}
	if err := c.Report(context.Background(), endpointapi.Outcome{Verb: "DEL", Code: 11}); err != nil {
		t.Errorf("report of a DEL error: %v", err)
	}
}
