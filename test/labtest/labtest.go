// Package labtest starts lab clusters for end-to-end tests and offers the
// helpers those tests share: building sluicectl, making pods, waiting for
// them, and probing between them.
package labtest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"

	"github.com/sluice-net/sluice/internal/lab"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// RepoRoot is the repository's top directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Clean(filepath.Join(filepath.Dir(file), "..", ".."))
}

// Binaries builds Sluice's commands once per test binary and returns the
// directory that holds them.
func Binaries() (string, error) {
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "sluice-bin-")
		if buildErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", binDir+"/", "./cmd/...")
		// Static binaries, as shipped: the dynamic loader would add about a
		// millisecond to every CNI call.
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		cmd.Dir = RepoRoot()
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("building commands: %v\n%s", err, out)
		}
	})
	return binDir, buildErr
}

// Lab is a running lab with a client for it.
type Lab struct {
	*lab.State
	Client kubernetes.Interface
	root   string
}

// Start brings up a lab in a fresh directory. The caller must call Stop.
func Start(o lab.Options) (*Lab, error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("lab tests need root (network namespaces); run 'make test' as root")
	}
	bins, err := Binaries()
	if err != nil {
		return nil, err
	}
	root, err := os.MkdirTemp("", "sluice-lab-test-")
	if err != nil {
		return nil, err
	}
	if o.Runtime == "" {
		// SLUICE_LAB_RUNTIME=containerd runs a package's labs on real
		// nodes, e.g. the policy truth tables.
		o.Runtime = os.Getenv("SLUICE_LAB_RUNTIME")
	}
	if o.Backend == "" && os.Getenv("SLUICE_LAB_BACKEND") != "" {
		// SLUICE_LAB_BACKEND=wireguard runs a package's labs with another
		// overlay backend, e.g. the policy truth tables; the line says so
		// in the test's output.
		o.Backend = os.Getenv("SLUICE_LAB_BACKEND")
		fmt.Fprintf(os.Stderr, "labtest: overlay backend %s (SLUICE_LAB_BACKEND)\n", o.Backend)
	}
	o.Sluicectl = filepath.Join(bins, "sluicectl")
	o.Dir = filepath.Join(root, "lab")
	if o.Name == "" {
		o.Name = filepath.Base(root)
	}
	s, err := lab.Up(o)
	if err != nil {
		if s != nil {
			_ = lab.Down(o.Dir)
		}
		os.RemoveAll(root)
		return nil, err
	}
	cs, err := s.Client()
	if err != nil {
		_ = lab.Down(o.Dir)
		os.RemoveAll(root)
		return nil, err
	}
	return &Lab{State: s, Client: cs, root: root}, nil
}

// Stop removes the lab. With SLUICE_KEEP_LOGS=DIR, the lab's logs are
// copied there first, for a post-mortem.
func (l *Lab) Stop() error {
	if dst := os.Getenv("SLUICE_KEEP_LOGS"); dst != "" {
		_ = os.MkdirAll(dst, 0o755)
		_ = exec.Command("cp", "-r", l.Path("logs"), filepath.Join(dst, l.Name)).Run()
	}
	err := lab.Down(l.Dir)
	os.RemoveAll(l.root)
	return err
}

// StartT brings up a lab for one test and removes it when the test ends,
// whether it passed or not.
func StartT(t testing.TB, o lab.Options) *Lab {
	t.Helper()
	l, err := Start(o)
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Stop(); err != nil {
			t.Errorf("lab down: %v", err)
		}
	})
	return l
}

// Kubectl runs the lab's kubectl with the admin kubeconfig.
func (l *Lab) Kubectl(ctx context.Context, stdin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, lab.KubectlPath(l.ToolsDir), append([]string{"--kubeconfig", l.AdminKubeconfig()}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("kubectl %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// PodSpec describes a test pod.
type PodSpec struct {
	Namespace, Name string
	Node            string // empty: let the scheduler choose
	Labels          map[string]string
	Annotations     map[string]string
	Ports           []corev1.ContainerPort
	HostNetwork     bool
}

// Pod builds the Pod object for a spec.
func (p PodSpec) Pod() *corev1.Pod {
	ns := p.Namespace
	if ns == "" {
		ns = "default"
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: p.Name, Labels: p.Labels, Annotations: p.Annotations},
		Spec: corev1.PodSpec{
			NodeName:    p.Node,
			HostNetwork: p.HostNetwork,
			Containers:  []corev1.Container{{Name: "app", Image: "lab", Ports: p.Ports}},
			// The lab kubelet tears down at once; no grace to wait for.
			TerminationGracePeriodSeconds: new(int64),
		},
	}
}

// AgnhostImage is the test image that test/tools/images.sh builds for real
// nodes.
const AgnhostImage = "registry.k8s.io/e2e-test-images/agnhost:2.63.0"

// RealPod is the spec's pod for real nodes, where pods run images: agnhost
// porter answers on every containerPort with the pod's namespace/name, over
// HTTP on TCP ports and as a datagram on UDP ports, like a lab pod.
func (p PodSpec) RealPod() *corev1.Pod {
	pod := p.Pod()
	c := &pod.Spec.Containers[0]
	c.Image, c.ImagePullPolicy, c.Args = AgnhostImage, corev1.PullNever, []string{"porter"}
	for _, cp := range c.Ports {
		kind := "SERVE_PORT_"
		if cp.Protocol == corev1.ProtocolUDP {
			kind = "SERVE_UDP_PORT_"
		}
		c.Env = append(c.Env, corev1.EnvVar{Name: fmt.Sprintf("%s%d", kind, cp.ContainerPort), Value: pod.Namespace + "/" + pod.Name})
	}
	return pod
}

// CreatePod creates a pod and waits until it is Running with an IP.
func (l *Lab) CreatePod(ctx context.Context, p PodSpec) (*corev1.Pod, error) {
	pod := p.Pod()
	if l.RealNodes() {
		pod = p.RealPod()
	}
	if err := l.EnsureNamespace(ctx, pod.Namespace); err != nil {
		return nil, err
	}
	if _, err := l.Client.CoreV1().Pods(pod.Namespace).Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		return nil, fmt.Errorf("creating pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return l.WaitRunning(ctx, pod.Namespace, pod.Name)
}

// EnsureNamespace creates a namespace if it is missing.
func (l *Lab) EnsureNamespace(ctx context.Context, name string) error {
	_, err := l.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating namespace %s: %w", name, err)
	}
	// Pods are admitted only once the namespace has its default
	// ServiceAccount.
	return wait.PollUntilContextTimeout(ctx, 50*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		_, err := l.Client.CoreV1().ServiceAccounts(name).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
}

// WaitRunning waits for a pod to be Running with an IP.
func (l *Lab) WaitRunning(ctx context.Context, namespace, name string) (*corev1.Pod, error) {
	var pod *corev1.Pod
	err := wait.PollUntilContextTimeout(ctx, 20*time.Millisecond, 2*time.Minute, true, func(ctx context.Context) (bool, error) {
		p, err := l.Client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		pod = p
		return p.Status.Phase == corev1.PodRunning && p.Status.PodIP != "", nil
	})
	if err != nil {
		return pod, fmt.Errorf("pod %s/%s not running: %w", namespace, name, err)
	}
	return pod, nil
}

// DeletePod deletes a pod and waits until it is gone from the API.
func (l *Lab) DeletePod(ctx context.Context, namespace, name string) error {
	if err := l.Client.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return wait.PollUntilContextTimeout(ctx, 20*time.Millisecond, time.Minute, true, func(ctx context.Context) (bool, error) {
		_, err := l.Client.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), nil
	})
}

// Probe connects from a place (POD, NODE, external) to a target (POD, NODE,
// external, IP) and returns the reply.
func (l *Lab) Probe(from, target string, port int, udp, ipv6 bool) (string, error) {
	place, err := l.Resolve(from)
	if err != nil {
		return "", err
	}
	ip, err := l.ResolveTarget(target, ipv6)
	if err != nil {
		return "", err
	}
	return lab.Probe(place, ip, port, udp, 2*time.Second)
}

// Exec runs a command at a place (NODE, POD, external) and returns its
// output.
func (l *Lab) Exec(where string, argv ...string) (string, error) {
	place, err := l.Resolve(where)
	if err != nil {
		return "", err
	}
	out, err := place.Command(argv...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s: %s: %v: %s", where, strings.Join(argv, " "), err, out)
	}
	return string(out), nil
}

// ProbeEventually probes until something answers or the timeout passes.
func (l *Lab) ProbeEventually(from, target string, port int, udp, ipv6 bool, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		got, err := l.Probe(from, target, port, udp, ipv6)
		if err == nil || time.Now().After(deadline) {
			return got, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Eventually polls cond every 50ms until it holds or the timeout passes.
func Eventually(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Main is a TestMain for packages whose tests share one lab: it starts the
// lab into *shared, runs each setup (which may return a cleanup, run after
// the tests in reverse order), runs the tests, removes the lab, and exits.
func Main(m *testing.M, o lab.Options, shared **Lab, setups ...func(*Lab) (func(), error)) {
	l, err := Start(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting the shared lab:", err)
		os.Exit(1)
	}
	*shared = l
	var cleanups []func()
	for _, setup := range setups {
		var cleanup func()
		if cleanup, err = setup(l); cleanup != nil {
			cleanups = append(cleanups, cleanup)
		}
		if err != nil {
			break
		}
	}
	code := 1
	if err != nil {
		fmt.Fprintln(os.Stderr, "setting up the shared lab:", err)
	} else {
		code = m.Run()
	}
	for i := len(cleanups) - 1; i >= 0; i-- {
		cleanups[i]()
	}
	if err := l.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "lab down:", err)
		code = 1
	}
	RemoveBinaries()
	os.Exit(code)
}

// Run is a TestMain for packages that start their labs in the tests
// themselves: it runs the tests and removes the binaries Binaries built.
func Run(m *testing.M) {
	code := m.Run()
	RemoveBinaries()
	os.Exit(code)
}

// RemoveBinaries removes what Binaries built, after the tests: each test
// binary builds its own copy (over 100 MB), and a make test that left them
// all in the temporary directory filled it a few GB at a time.
func RemoveBinaries() {
	if binDir != "" {
		if err := os.RemoveAll(binDir); err != nil {
			fmt.Fprintln(os.Stderr, "removing the test binaries:", err)
		}
	}
}
