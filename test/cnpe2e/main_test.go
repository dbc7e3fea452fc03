// Package cnpe2e proves ClusterNetworkPolicy on a lab of real nodes
// (kubelet and containerd): truth tables of its interplay with
// NetworkPolicy and Calico tiers probed with real connections, the status
// the agents report, `kubectl get cnp`, and the public conformance suite
// of sigs.k8s.io/network-policy-api.
package cnpe2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	v3 "github.com/projectcalico/api/pkg/apis/projectcalico/v3"
	calicoclient "github.com/projectcalico/api/pkg/client/clientset_generated/clientset"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/tools/clientcmd"
	cnpv1beta1 "sigs.k8s.io/network-policy-api/apis/v1beta1"
	cnpclient "sigs.k8s.io/network-policy-api/pkg/client/clientset/versioned"
	"sigs.k8s.io/yaml"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

var (
	shared *labtest.Lab
	cnps   cnpclient.Interface
	calico calicoclient.Interface
)

func TestMain(m *testing.M) {
	if reason := missing(); reason != "" {
		// Only what cannot exist here skips: not root, or no containerd.
		fmt.Println("cnpe2e: skipped:", reason)
		os.Exit(0)
	}
	labtest.Main(m, lab.Options{Nodes: 2, Runtime: lab.RuntimeContainerd, Timeout: 5 * time.Minute}, &shared, setup)
}

func missing() string {
	if os.Geteuid() != 0 {
		return "real nodes need root (network and mount namespaces, cgroups)"
	}
	for _, c := range []string{"containerd", "runc", "ctr", "nsenter"} {
		if _, err := exec.LookPath(c); err != nil {
			return c + " is not installed (make deps installs it)"
		}
	}
	return ""
}

// setup makes the clients, has the agents run this tree's sluiced, and
// starts pods a and b in namespaces x and y, spread over the nodes,
// serving TCP 80 and UDP 53 (named http and dns).
func setup(l *labtest.Lab) (func(), error) {
	rc, err := clientcmd.BuildConfigFromFlags("", l.AdminKubeconfig())
	if err != nil {
		return nil, err
	}
	if cnps, err = cnpclient.NewForConfig(rc); err != nil {
		return nil, err
	}
	if calico, err = calicoclient.NewForConfig(rc); err != nil {
		return nil, err
	}
	if err := runBranchAgents(l); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	i := 0
	for _, ns := range []string{"x", "y"} {
		if _, err := l.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns, Labels: map[string]string{"ns": ns}}}, metav1.CreateOptions{}); err != nil {
			return nil, err
		}
		for _, name := range []string{"a", "b"} {
			ports := []corev1.ContainerPort{{Name: "http", ContainerPort: 80, Protocol: corev1.ProtocolTCP}, {Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP}}
			spec := labtest.PodSpec{Namespace: ns, Name: name, Node: l.Nodes[i%len(l.Nodes)].Name, Labels: map[string]string{"pod": name}, Ports: ports}
			i++
			if _, err := l.CreatePod(ctx, spec); err != nil {
				return nil, err
			}
		}
	}
	return nil, nil
}

// row is one probe and its expected outcome.
type row struct {
	from, to string
	udp      bool
	want     bool
}

func (r row) String() string {
	proto := "tcp/80"
	if r.udp {
		proto = "udp/53"
	}
	return fmt.Sprintf("%s -> %s %s", r.from, r.to, proto)
}

// probe connects once; a dropped connection times out.
func probe(r row) bool {
	place, err := shared.Resolve(r.from)
	if err != nil {
		return false
	}
	ip, err := shared.ResolveTarget(r.to, false)
	if err != nil {
		return false
	}
	port := 80
	if r.udp {
		port = 53
	}
	reply, err := lab.Probe(place, ip, port, r.udp, 700*time.Millisecond)
	return err == nil && reply == r.to
}

// checkRows probes every row in parallel until all are as expected, for
// up to 20 s while the nodes converge, and reports the rows that are not.
func checkRows(t *testing.T, name string, rows []row) {
	t.Helper()
	var wrong []string
	_ = wait.PollUntilContextTimeout(context.Background(), 500*time.Millisecond, 20*time.Second, true, func(context.Context) (bool, error) {
		var mu sync.Mutex
		var wg sync.WaitGroup
		wrong = nil
		for _, r := range rows {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if got := probe(r); got != r.want {
					mu.Lock()
					wrong = append(wrong, fmt.Sprintf("%s: connected=%v, want %v", r, got, r.want))
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		return len(wrong) == 0, nil
	})
	if len(wrong) > 0 {
		sort.Strings(wrong)
		t.Errorf("%s:\n%s", name, strings.Join(wrong, "\n"))
	}
}

// applyYAML creates NetworkPolicies and ClusterNetworkPolicies written as
// YAML documents, and deletes them when the test ends.
func applyYAML(t *testing.T, docs ...string) {
	t.Helper()
	ctx := context.Background()
	for _, doc := range docs {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatal(err)
		}
		switch meta.Kind {
		case "NetworkPolicy":
			var np networkingv1.NetworkPolicy
			mustYAML(t, doc, &np)
			if _, err := shared.Client.NetworkingV1().NetworkPolicies(np.Namespace).Create(ctx, &np, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				_ = shared.Client.NetworkingV1().NetworkPolicies(np.Namespace).Delete(context.Background(), np.Name, metav1.DeleteOptions{})
			})
		case "ClusterNetworkPolicy":
			var o cnpv1beta1.ClusterNetworkPolicy
			mustYAML(t, doc, &o)
			if _, err := cnps.PolicyV1beta1().ClusterNetworkPolicies().Create(ctx, &o, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				_ = cnps.PolicyV1beta1().ClusterNetworkPolicies().Delete(context.Background(), o.Name, metav1.DeleteOptions{})
			})
		case "Tier":
			var o v3.Tier
			mustYAML(t, doc, &o)
			if _, err := calico.ProjectcalicoV3().Tiers().Create(ctx, &o, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				_ = calico.ProjectcalicoV3().Tiers().Delete(context.Background(), o.Name, metav1.DeleteOptions{})
			})
		case "GlobalNetworkPolicy":
			var o v3.GlobalNetworkPolicy
			mustYAML(t, doc, &o)
			if _, err := calico.ProjectcalicoV3().GlobalNetworkPolicies().Create(ctx, &o, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				_ = calico.ProjectcalicoV3().GlobalNetworkPolicies().Delete(context.Background(), o.Name, metav1.DeleteOptions{})
			})
		default:
			t.Fatalf("kind %q", meta.Kind)
		}
	}
}

func mustYAML(t *testing.T, doc string, into any) {
	t.Helper()
	if err := yaml.UnmarshalStrict([]byte(doc), into); err != nil {
		t.Fatalf("%v\n%s", err, doc)
	}
}
