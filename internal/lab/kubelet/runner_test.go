package kubelet

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sluice-net/sluice/internal/lab/container"
)

// fakeInit stands in for `sluicectl lab container-init --spec DIR/NAME.json`:
// it acts out the container named by the spec file. It records its start in
// DIR/order only once its signal handling is in place, so a test that waits
// for the record never signals a container that is still starting.
const fakeInit = `#!/bin/sh
spec="$4"; dir=$(dirname "$spec"); name=$(basename "$spec" .json)
case "$name" in
stubborn) trap '' TERM ;;
polite) trap 'exit 0' TERM ;;
esac
echo "$name" >> "$dir/order"
case "$name" in
init) exit 0 ;;
crash) exit 3 ;;
*) while :; do sleep 0.05; done ;;
esac
`

func newTestRunner(t *testing.T, initContainers []string, containers ...string) *podRunner {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("containers start in a new mount namespace, which needs root")
	}
	dir := t.TempDir()
	script := filepath.Join(dir, "fake-init")
	if err := os.WriteFile(script, []byte(fakeInit), 0o755); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "p"}}
	for _, c := range initContainers {
		pod.Spec.InitContainers = append(pod.Spec.InitContainers, corev1.Container{Name: c})
	}
	for _, c := range containers {
		pod.Spec.Containers = append(pod.Spec.Containers, corev1.Container{Name: c})
	}
	return &podRunner{
		pod: pod, dir: dir, logDir: dir, sluicec: script, disabled: filepath.Join(dir, "disabled"),
		env:    func(corev1.Container) ([]string, error) { return nil, nil },
		mounts: func(corev1.Container) ([]container.Mount, error) { return nil, nil },
		notify: func() {},
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("never: %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func running(r *podRunner, name string) bool {
	_, _, regular := r.snapshot()
	for _, c := range regular {
		if c.Name == name {
			return c.State.Running != nil
		}
	}
	return false
}

// TestRunnerInitFirstThenSIGKILLAfterGrace: init containers run to
// completion before the containers; stop sends SIGTERM, and SIGKILL to a
// container that ignores it once the grace period is over.
func TestRunnerInitFirstThenSIGKILLAfterGrace(t *testing.T) {
	r := newTestRunner(t, []string{"init"}, "stubborn", "polite")
	r.start(context.Background())
	waitFor(t, "both containers running", func() bool { return running(r, "stubborn") && running(r, "polite") })
	// Running means started; the record means ready for signals.
	waitFor(t, "both containers started", func() bool {
		order, _ := os.ReadFile(filepath.Join(r.dir, "order"))
		return len(strings.Fields(string(order))) == 3
	})
	order, _ := os.ReadFile(filepath.Join(r.dir, "order"))
	if lines := strings.Fields(string(order)); len(lines) != 3 || lines[0] != "init" {
		t.Errorf("start order %q, want init first", lines)
	}
	initialized, inits, _ := r.snapshot()
	if !initialized || inits[0].State.Terminated == nil || inits[0].State.Terminated.ExitCode != 0 {
		t.Errorf("init container status %+v", inits)
	}
	r.stop(200 * time.Millisecond)
	last := map[string]*corev1.ContainerStateTerminated{}
	r.mu.Lock()
	for _, cs := range r.containers {
		last[cs.spec.Name] = cs.last
		if cs.proc != nil {
			t.Errorf("%s still has a process after stop", cs.spec.Name)
		}
	}
	r.mu.Unlock()
	if l := last["stubborn"]; l == nil || l.Signal != int32(syscall.SIGKILL) {
		t.Errorf("the container ignoring SIGTERM ended with %+v, want SIGKILL", l)
	}
	if l := last["polite"]; l == nil || l.Signal != 0 || l.ExitCode != 0 {
		t.Errorf("the container honouring SIGTERM ended with %+v, want exit 0", l)
	}
}

// TestRunnerRestartsExitedContainer: restartPolicy Always, counted, with
// the last termination kept.
func TestRunnerRestartsExitedContainer(t *testing.T) {
	r := newTestRunner(t, nil, "crash")
	r.start(context.Background())
	defer r.stop(time.Second)
	waitFor(t, "two restarts", func() bool {
		_, _, regular := r.snapshot()
		return regular[0].RestartCount >= 2
	})
	_, _, regular := r.snapshot()
	if lt := regular[0].LastTerminationState.Terminated; lt == nil || lt.ExitCode != 3 {
		t.Errorf("last termination %+v, want exit code 3", regular[0].LastTerminationState)
	}
	if regular[0].Ready {
		t.Error("a crashing container is Ready")
	}
}

// TestRunnerProbes: the readiness probe decides Ready, and a failing
// liveness probe gets the container killed and restarted. The probes go to
// servers on loopback.
func TestRunnerProbes(t *testing.T) {
	var healthy atomic.Bool
	healthy.Store(true)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		if !healthy.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	u, _ := url.Parse(srv.URL)
	host, port, _ := net.SplitHostPort(u.Host)
	probe := func(failures int32) *corev1.Probe {
		p, _ := strconv.Atoi(port)
		return &corev1.Probe{PeriodSeconds: 1, FailureThreshold: failures, ProbeHandler: corev1.ProbeHandler{
			HTTPGet: &corev1.HTTPGetAction{Host: host, Port: intstr.FromInt(p), Path: "/readyz"}}}
	}
	r := newTestRunner(t, nil, "polite")
	r.pod.Spec.Containers[0].ReadinessProbe = probe(1)
	r.pod.Spec.Containers[0].LivenessProbe = probe(3)
	r.start(context.Background())
	defer r.stop(time.Second)
	status := func() corev1.ContainerStatus { _, _, regular := r.snapshot(); return regular[0] }
	waitFor(t, "ready", func() bool { return status().Ready })
	healthy.Store(false)
	waitFor(t, "unready", func() bool { return !status().Ready })
	waitFor(t, "restarted by the liveness probe", func() bool { return status().RestartCount >= 1 })
	if lt := status().LastTerminationState.Terminated; lt == nil || lt.Signal != int32(syscall.SIGKILL) {
		t.Errorf("last termination %+v, want SIGKILL", lt)
	}
	healthy.Store(true)
	waitFor(t, "ready again", func() bool { return status().Ready })
}
