// Package demo shows NetworkPolicy at work in a lab: pods on different
// nodes, the TCP connectivity between every pair, and how a default-deny
// policy and then an allow policy for one pair change it.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"

	"github.com/sluice-net/sluice/internal/lab"
)

const (
	// Namespace holds the demo's pods and policies.
	Namespace = "demo"
	// Port is where every demo pod answers with its name.
	Port = 8080
	// probeTimeout bounds a probe that a policy drops.
	probeTimeout = time.Second
	// settle is how long a policy change may take to show in the matrix.
	settle = 30 * time.Second
)

// Pods are the demo's pods, spread over the lab's nodes in turn.
var Pods = []string{"a", "b", "c"}

// Pair is a connection from one pod to another.
type Pair struct{ From, To string }

// Matrix says which pairs connect. Pods never probe themselves.
type Matrix map[Pair]bool

// Step is one stage of the demo: a change to the policies and the
// connectivity it must lead to.
type Step struct {
	Title string
	Apply func(ctx context.Context, cs kubernetes.Interface) error
	Want  Matrix
}

// Steps are the demo's stages: no policy, default deny, then one allowed
// pair (a to b).
func Steps() []Step {
	return []Step{
		{Title: "no NetworkPolicy: every pod reaches every other", Apply: noop, Want: Expect(func(Pair) bool { return true })},
		{Title: "policy default-deny: no pod accepts ingress", Apply: apply(defaultDeny()), Want: Expect(func(Pair) bool { return false })},
		{Title: "policy allow-a-to-b: a may reach b on TCP 8080", Apply: apply(allowAToB()), Want: Expect(func(p Pair) bool { return p == Pair{"a", "b"} })},
	}
}

// Expect builds the matrix of every pair from a rule.
func Expect(connected func(Pair) bool) Matrix {
	m := Matrix{}
	for _, from := range Pods {
		for _, to := range Pods {
			if from != to {
				m[Pair{from, to}] = connected(Pair{from, to})
			}
		}
	}
	return m
}

func noop(context.Context, kubernetes.Interface) error { return nil }

func apply(np *networkingv1.NetworkPolicy) func(context.Context, kubernetes.Interface) error {
	return func(ctx context.Context, cs kubernetes.Interface) error {
		_, err := cs.NetworkingV1().NetworkPolicies(Namespace).Create(ctx, np, metav1.CreateOptions{})
		if err != nil {
			return fmt.Errorf("creating NetworkPolicy %s: %w", np.Name, err)
		}
		return nil
	}
}

func defaultDeny() *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "default-deny", Namespace: Namespace},
		Spec:       networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}},
	}
}

func allowAToB() *networkingv1.NetworkPolicy {
	tcp := corev1.ProtocolTCP
	port := intstr.FromInt32(Port)
	return &networkingv1.NetworkPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "allow-a-to-b", Namespace: Namespace},
		Spec: networkingv1.NetworkPolicySpec{
			PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "b"}},
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{
				From:  []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "a"}}}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}},
			}},
		},
	}
}

// Demo runs the demo in one lab.
type Demo struct {
	lab    *lab.State
	client kubernetes.Interface
	nodes  map[string]string // pod -> node
}

// New prepares a demo for a lab.
func New(s *lab.State) (*Demo, error) {
	cs, err := s.Client()
	if err != nil {
		return nil, err
	}
	d := &Demo{lab: s, client: cs, nodes: map[string]string{}}
	for i, p := range Pods {
		d.nodes[p] = s.Nodes[i%len(s.Nodes)].Name
	}
	return d, nil
}

// Run sets the demo up, runs every step, prints each matrix to out, and
// fails if a matrix is not what the step expects.
func Run(ctx context.Context, s *lab.State, out io.Writer) error {
	d, err := New(s)
	if err != nil {
		return err
	}
	if err := d.Setup(ctx); err != nil {
		return err
	}
	if s.RunsKubeProxy() {
		fmt.Fprintf(out, "each pod probes the others at their Services' names (demo/a, demo/b, demo/c: CoreDNS resolves them, kube-proxy DNATs them)\n")
	}
	var failed []string
	for i, st := range Steps() {
		if err := st.Apply(ctx, d.client); err != nil {
			return err
		}
		got, err := d.WaitFor(ctx, st.Want)
		fmt.Fprintf(out, "\n%d. %s\n%s", i+1, st.Title, d.Format(got, st.Want))
		if err != nil {
			failed = append(failed, st.Title)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("connectivity differs from what is expected after: %s", strings.Join(failed, "; "))
	}
	fmt.Fprintf(out, "\nevery matrix is as expected; the pods and policies stay in namespace %q\n", Namespace)
	return nil
}

// Setup (re)creates the demo's pods and removes its policies.
func (d *Demo) Setup(ctx context.Context) error {
	_, err := d.client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: Namespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating namespace %s: %w", Namespace, err)
	}
	if err := d.client.NetworkingV1().NetworkPolicies(Namespace).DeleteCollection(ctx, metav1.DeleteOptions{}, metav1.ListOptions{}); err != nil {
		return fmt.Errorf("removing earlier demo policies: %w", err)
	}
	for _, p := range Pods {
		if err := d.client.CoreV1().Pods(Namespace).Delete(ctx, p, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("removing earlier pod %s: %w", p, err)
		}
	}
	// Pods pass admission only once the namespace has its default
	// ServiceAccount.
	if err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		_, err := d.client.CoreV1().ServiceAccounts(Namespace).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	}); err != nil {
		return fmt.Errorf("namespace %s has no default ServiceAccount: %w", Namespace, err)
	}
	for _, p := range Pods {
		if err := d.createPod(ctx, p); err != nil {
			return err
		}
	}
	if d.lab.RunsKubeProxy() {
		for _, p := range Pods {
			if err := d.ensureService(ctx, p); err != nil {
				return err
			}
		}
	}
	return nil
}

// ensureService gives a pod a ClusterIP Service of its own name, which the
// other pods probe by name on labs with kube-proxy and CoreDNS: the name
// resolves through CoreDNS, kube-proxy DNATs the ClusterIP to the pod, and
// policy judges what arrives.
func (d *Demo) ensureService(ctx context.Context, name string) error {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: Namespace},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": name},
			Ports:    []corev1.ServicePort{{Port: Port, TargetPort: intstr.FromInt32(Port)}},
		},
	}
	_, err := d.client.CoreV1().Services(Namespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating Service %s/%s: %w", Namespace, name, err)
	}
	return nil
}

func (d *Demo) createPod(ctx context.Context, name string) error {
	web := corev1.Container{Name: "web", Image: "lab", Ports: []corev1.ContainerPort{{ContainerPort: Port}}}
	if d.lab.RealNodes() {
		// Real nodes run images: agnhost serves its name over HTTP.
		web.Image, web.ImagePullPolicy = AgnhostImage, corev1.PullNever
		web.Args = []string{"netexec", fmt.Sprintf("--http-port=%d", Port), "--udp-port=8081"}
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: Namespace, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			NodeName:                      d.nodes[name],
			Containers:                    []corev1.Container{web},
			TerminationGracePeriodSeconds: new(int64),
		},
	}
	// The previous demo's pod may still be going away.
	err := wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		_, err := d.client.CoreV1().Pods(Namespace).Create(ctx, pod, metav1.CreateOptions{})
		return err == nil, nil
	})
	if err != nil {
		return fmt.Errorf("creating pod %s/%s: %w", Namespace, name, err)
	}
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		p, err := d.client.CoreV1().Pods(Namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil || p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
			return false, nil
		}
		_, err = d.lab.Resolve(Namespace + "/" + name)
		return err == nil, nil
	})
	if err != nil {
		return fmt.Errorf("pod %s/%s not running: %w", Namespace, name, err)
	}
	return nil
}

// Measure probes every pair once, all at the same time.
func (d *Demo) Measure() Matrix {
	m := Matrix{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for pair := range Expect(func(Pair) bool { return true }) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok := d.connects(pair)
			mu.Lock()
			m[pair] = ok
			mu.Unlock()
		}()
	}
	wg.Wait()
	return m
}

// AgnhostImage is the test image that test/tools/images.sh builds.
const AgnhostImage = "registry.k8s.io/e2e-test-images/agnhost:2.63.0"

// connects reports whether the target pod itself answered. On real nodes
// the probe runs inside the source pod, through kubectl exec, as the
// public test suites probe: curl asks the target's agnhost for its name,
// at its Service's name when the lab runs kube-proxy and CoreDNS, else at
// its IP.
func (d *Demo) connects(p Pair) bool {
	if d.lab.RealNodes() {
		target := p.To
		if !d.lab.RunsKubeProxy() {
			ip, err := d.lab.ResolveTarget(Namespace+"/"+p.To, false)
			if err != nil {
				return false
			}
			target = ip
		}
		ip := target
		ctx, cancel := context.WithTimeout(context.Background(), probeTimeout+5*time.Second)
		defer cancel()
		secs := fmt.Sprintf("%.1f", probeTimeout.Seconds())
		out, err := d.lab.Kubectl(ctx, "-n", Namespace, "exec", p.From, "--", "curl", "-s", "--max-time", secs, fmt.Sprintf("http://%s:%d/hostname", ip, Port))
		return err == nil && strings.TrimSpace(out) == p.To
	}
	from, err := d.lab.Resolve(Namespace + "/" + p.From)
	if err != nil {
		return false
	}
	ip, err := d.lab.ResolveTarget(Namespace+"/"+p.To, false)
	if err != nil {
		return false
	}
	reply, err := lab.Probe(from, ip, Port, false, probeTimeout)
	return err == nil && reply == Namespace+"/"+p.To
}

// ErrUnexpected means the connectivity did not become what a step expects.
var ErrUnexpected = errors.New("connectivity is not as expected")

// WaitFor measures until the matrix equals want, or returns the last one
// measured with ErrUnexpected once a policy had time to take effect.
func (d *Demo) WaitFor(ctx context.Context, want Matrix) (Matrix, error) {
	deadline := time.Now().Add(settle)
	for {
		got := d.Measure()
		if got.Equal(want) {
			return got, nil
		}
		if time.Now().After(deadline) {
			return got, ErrUnexpected
		}
		select {
		case <-ctx.Done():
			return got, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Equal compares two matrices.
func (m Matrix) Equal(o Matrix) bool {
	if len(m) != len(o) {
		return false
	}
	for p, v := range m {
		if w, ok := o[p]; !ok || w != v {
			return false
		}
	}
	return true
}

// Format prints a matrix with rows for sources and columns for targets;
// a cell that differs from want is marked with "!".
func (d *Demo) Format(got, want Matrix) string {
	var b strings.Builder
	label := func(p string) string { return fmt.Sprintf("%s (%s)", p, d.nodes[p]) }
	fmt.Fprintf(&b, "  %-14s", "from \\ to")
	for _, to := range Pods {
		fmt.Fprintf(&b, " %-14s", label(to))
	}
	b.WriteString("\n")
	for _, from := range Pods {
		fmt.Fprintf(&b, "  %-14s", label(from))
		for _, to := range Pods {
			cell := "-"
			if from != to {
				pair := Pair{from, to}
				cell = map[bool]string{true: "connects", false: "blocked"}[got[pair]]
				if got[pair] != want[pair] {
					cell += " !"
				}
			}
			fmt.Fprintf(&b, " %-14s", cell)
		}
		b.WriteString("\n")
	}
	return b.String()
}
