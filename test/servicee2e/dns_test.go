package servicee2e

import (
	"context"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

const dnsNS = "dns"

// dnsRecipe: a namespace with default-deny egress and the README's "allow
// DNS to kube-system/k8s-app=kube-dns on UDP and TCP 53" resolves names,
// over both transports, and reaches nothing else.
func (c *cluster) dnsRecipe(t *testing.T) {
	ctx := ctxT(t, 3*time.Minute)
	if err := c.EnsureNamespace(ctx, dnsNS); err != nil {
		t.Fatal(err)
	}
	if _, err := c.createPod(ctx, dnsNS, "resolver", map[string]string{"role": "resolver"}, "node-2"); err != nil {
		t.Fatal(err)
	}
	defer c.deletePolicies(t, dnsNS, "default-deny-egress", "allow-dns")
	webName := "web." + ns + ".svc." + lab.ClusterDomain

	// The control: with no policy, the pod resolves through its
	// resolv.conf (the kubelet's --cluster-dns) and reaches web.
	if got := c.getent(t, webName); got != c.clusterIPs["web"] {
		t.Fatalf("getent hosts %s = %q, want %s", webName, got, c.clusterIPs["web"])
	}
	c.expect(t, dnsNS+"/resolver", c.svc("web"), true)

	// Default deny egress alone: not even DNS.
	c.applyPolicy(t, defaultDenyEgress(dnsNS))
	if !labtest.Eventually(15*time.Second, func() bool { _, err := c.lookup(t, "udp", webName); return err != nil }) {
		t.Fatal("DNS still answers under default-deny egress")
	}

	// The recipe: names resolve, over UDP and TCP, and nothing else is
	// reachable.
	c.applyPolicy(t, allowDNS(dnsNS))
	for _, network := range []string{"udp", "tcp"} {
		var addrs []string
		var err error
		if !labtest.Eventually(15*time.Second, func() bool { addrs, err = c.lookup(t, network, webName); return err == nil }) {
			t.Fatalf("DNS over %s under the recipe: %v", network, err)
		}
		if !slices.Contains(addrs, c.clusterIPs["web"]) {
			t.Errorf("DNS over %s: %s = %v, want %s", network, webName, addrs, c.clusterIPs["web"])
		}
	}
	for name, want := range map[string]string{
		"kubernetes.default": "10.96.0.1",
		"web." + ns:          c.clusterIPs["web"],
		"kube-dns.kube-system.svc." + lab.ClusterDomain: lab.DNSServiceIP,
	} {
		if got := c.getent(t, name); got != want {
			t.Errorf("getent hosts %s = %q, want %s", name, got, want)
		}
	}
	c.expect(t, dnsNS+"/resolver", c.svc("web"), false)
	c.expect(t, dnsNS+"/resolver", net.JoinHostPort(c.ExternalIP4, "8080"), false)
}

// getent resolves a name inside the resolver pod, as its programs do
// (resolv.conf, search domains), and returns the first address or "".
func (c *cluster) getent(t *testing.T, name string) string {
	t.Helper()
	ctx := ctxT(t, 20*time.Second)
	out, err := c.Kubectl(ctx, "", "exec", "-n", dnsNS, "resolver", "--", "getent", "hosts", name)
	if err != nil {
		t.Logf("getent hosts %s: %v", name, err)
		return ""
	}
	f := strings.Fields(out)
	if len(f) == 0 {
		return ""
	}
	return f[0]
}

// lookup asks kube-dns for a name from the resolver pod's network
// namespace, over one transport.
func (c *cluster) lookup(t *testing.T, network, name string) ([]string, error) {
	place, err := c.Resolve(dnsNS + "/resolver")
	if err != nil {
		t.Fatal(err)
	}
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return place.Dial(network, net.JoinHostPort(lab.DNSServiceIP, "53"), 2*time.Second)
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	return r.LookupHost(ctx, name)
}
