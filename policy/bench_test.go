package policy

import (
	"fmt"
	"net/netip"
	"sort"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/sluice-net/sluice/internal/forward"
	"github.com/sluice-net/sluice/internal/iptables"
	"github.com/sluice-net/sluice/internal/nettest"
)

// scale builds the benchmark's cluster: 5,000 pods in 100 namespaces, 1,000
// policies (10 per namespace, each selecting one app and allowing it from
// another app and from a labelled namespace), 100 local endpoints.
func scale(nPods, nPolicies, nLocal int) (map[string]*Policy, []*Pod, map[string]*Namespace, []LocalEndpoint) {
	namespaces := map[string]*Namespace{}
	for i := 0; i < 100; i++ {
		name := fmt.Sprintf("ns%d", i)
		namespaces[name] = &Namespace{Name: name, Labels: labels.Set{"team": fmt.Sprint(i % 10)}}
	}
	var pods []*Pod
	for i := 0; i < nPods; i++ {
		pods = append(pods, &Pod{
			Namespace: fmt.Sprintf("ns%d", i%100), Name: fmt.Sprintf("p%d", i),
			Labels:     labels.Set{"app": fmt.Sprintf("app%d", i%20)},
			IPs:        []netip.Addr{netip.AddrFrom4([4]byte{10, byte(244 + i/65536), byte(i / 256 % 256), byte(i % 256)})},
			NamedPorts: map[string]NamedPort{"http": {TCP, 8080}},
		})
	}
	pols := map[string]*Policy{}
	for i := 0; i < nPolicies; i++ {
		ns := fmt.Sprintf("ns%d", i%100)
		p := np(ns, fmt.Sprintf("pol%d", i), networkingv1.NetworkPolicySpec{
			PodSelector: *sel("app", fmt.Sprintf("app%d", i%20)),
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: sel("app", fmt.Sprintf("app%d", (i+1)%20))}, {NamespaceSelector: sel("team", fmt.Sprint(i%10))}},
				Ports: []networkingv1.NetworkPolicyPort{port(int32(8000+i%50), corev1.ProtocolTCP), namedPort("http", corev1.ProtocolTCP)},
			}},
		})
		pols[p.Key] = p
	}
	var locals []LocalEndpoint
	for i := 0; i < nLocal; i++ {
		pod := pods[i*(nPods/nLocal)]
		in, out := Selecting(pols, pod, nil)
		locals = append(locals, LocalEndpoint{Pod: pod, HostVeth: "sl" + shortHash(pod.Name)[:11], Ingress: in, Egress: out})
	}
	return pols, pods, namespaces, locals
}

// BenchmarkPolicyProgramming measures, in a network namespace with the
// nft backend: (b) the first full programming of the state, as at agent
// start; (a) the latency of one policy change, from render to the kernel,
// p50 and p99; (d) rules per endpoint at 100 and 5,000 pods.
func BenchmarkPolicyProgramming(b *testing.B) {
	pols, pods, nss, locals := scale(5000, 1000, 100)
	n := nettest.NewNS(b)
	nettest.Do(b, n, func() error {
		r, err := iptables.New(iptables.IPv4, iptables.ModeNFT)
		if err != nil {
			return err
		}
		if err := forward.Apply(r); err != nil {
			return err
		}
		ren := &Renderer{AcceptMark: 0x10000}
		d := NewDataplane(r, false)
		start := time.Now()
		if _, err := d.Apply(ren.Render(pols, locals, pods, nss)); err != nil {
			return err
		}
		full := time.Since(start)
		rules := 0
		for _, c := range ren.Render(pols, locals, pods, nss).Chains {
			rules += len(c)
		}

		var lat []time.Duration
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			// Change one policy's port, as an operator's edit would.
			key := fmt.Sprintf("ns%d/pol%d", i%100, i%1000)
			p := *pols[key]
			rule := p.IngressRules[0]
			rule.Dst.Ports = []Port{{Protocol: TCP, Number: int32(9000 + i%1000)}}
			p.IngressRules = []Rule{rule}
			pols[key] = &p
			t0 := time.Now()
			if _, err := d.Apply(ren.Render(pols, locals, pods, nss)); err != nil {
				return err
			}
			lat = append(lat, time.Since(t0))
		}
		b.StopTimer()
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "change-p50-ms")
		b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "change-p99-ms")
		b.ReportMetric(full.Seconds(), "full-program-s")
		b.ReportMetric(float64(rules), "rules-total")
		return forward.Remove(r)
	})
	for _, size := range []int{100, 5000} {
		pols, pods, nss, locals := scale(size, 1000, 100)
		rs := (&Renderer{AcceptMark: 0x10000}).Render(pols, locals, pods, nss)
		b.ReportMetric(float64(len(rs.Chains[EndpointChain(locals[0].HostVeth, false)])), fmt.Sprintf("rules-per-endpoint-%dpods", size))
	}
}
