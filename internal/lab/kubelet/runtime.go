package kubelet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/internal/lab/container"
)

// SluiceImage is the repository of Sluice's image. Pods whose containers all
// use it (any tag) run as processes from the lab's staged image, when the
// lab has one (`--cni manifest`).
const SluiceImage = "ghcr.io/sluice-net/sluice"

// imageEntrypoint is the Dockerfile's ENTRYPOINT, used when a container has
// no command.
var imageEntrypoint = []string{"/opt/sluice/bin/sluiced"}

// imagePath is the Dockerfile's (debian's) PATH.
const imagePath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Restart backoff of a container that exited: doubling from the first
// delay up to the cap, and back to the first delay after a run that lasted
// resetAfter. Shorter than the kubelet's 10 s to 5 min (reset after 10
// min), so the lab recovers at the pace of a test that kills its agents.
const (
	firstBackoff = time.Second
	maxBackoff   = 30 * time.Second
	resetAfter   = 10 * time.Second
)

func isSluiceImage(image string) bool {
	repo, _, _ := strings.Cut(image, "@")
	if i := strings.LastIndexByte(repo, ':'); i > strings.LastIndexByte(repo, '/') {
		repo = repo[:i]
	}
	return repo == SluiceImage
}

// runsAsProcesses reports whether the kubelet runs the pod's containers
// instead of standing in for them with responders.
func (k *Kubelet) runsAsProcesses(pod *corev1.Pod) bool {
	if !k.lab.RunsSluiceImage() || !pod.Spec.HostNetwork {
		return false
	}
	for _, c := range append(append([]corev1.Container{}, pod.Spec.InitContainers...), pod.Spec.Containers...) {
		if !isSluiceImage(c.Image) {
			return false
		}
	}
	return true
}

// containerState is what the kubelet knows of one container; it becomes the
// container's status in the API.
type containerState struct {
	spec     corev1.Container
	init     bool
	proc     *os.Process
	started  time.Time
	ready    bool
	restarts int32
	// waiting is the reason the container is not running (CrashLoopBackOff,
	// PodInitializing) when proc is nil and it has not completed.
	waiting   string
	completed bool // an init container that exited 0
	last      *corev1.ContainerStateTerminated
	// kill ends the current run (a failed liveness probe).
	kill func()
	// exited is closed when the current run's process has been reaped.
	exited chan struct{}
}

// podRunner runs a pod's init containers to completion in order, then its
// containers, restarting any that exit (restartPolicy Always), probing
// them, and stopping them all with SIGTERM then SIGKILL.
type podRunner struct {
	pod     *corev1.Pod
	node    lab.Node
	dir     string // per-pod files: container specs and scratch dirs
	logDir  string
	image   string
	env     func(c corev1.Container) ([]string, error)
	mounts  func(c corev1.Container) ([]container.Mount, error)
	notify  func() // the pod's status changed
	sluicec string // the binary that runs `lab container-init`
	// disabled is lab.Node.AgentDisabledPath: while it exists, no
	// container starts.
	disabled string

	// grace is how long stop waits between SIGTERM and SIGKILL.
	grace time.Duration

	mu          sync.Mutex
	stopping    bool
	initialized bool
	containers  []*containerState // init containers first
	cancel      context.CancelFunc
	wg          sync.WaitGroup
}

// podDir holds a pod's volumes and container specs on this node.
func (k *Kubelet) podDir(uid types.UID) string {
	return filepath.Join(k.node.Dir, "containers", string(uid))
}

// newRunner prepares the pod's volumes and a runner for its containers.
func (k *Kubelet) newRunner(ctx context.Context, pod *corev1.Pod, sb *sandbox) (*podRunner, error) {
	dir := k.podDir(pod.UID)
	sources, err := k.prepareVolumes(ctx, pod, dir)
	if err != nil {
		return nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("finding sluicectl for container-init: %w", err)
	}
	grace := 30 * time.Second
	if g := pod.Spec.TerminationGracePeriodSeconds; g != nil {
		grace = time.Duration(*g) * time.Second
	}
	key := sb.key()
	return &podRunner{
		pod:      pod.DeepCopy(),
		node:     k.node,
		dir:      dir,
		logDir:   k.lab.Path("logs"),
		image:    k.lab.ImageDir(),
		env:      func(c corev1.Container) ([]string, error) { return k.containerEnv(pod, c) },
		mounts:   func(c corev1.Container) ([]container.Mount, error) { return containerMounts(c, sources) },
		notify:   func() { k.queue.Add(key) },
		sluicec:  exe,
		grace:    grace,
		disabled: k.node.AgentDisabledPath(),
	}, nil
}

func (r *podRunner) start(ctx context.Context) {
	ctx, r.cancel = context.WithCancel(ctx)
	for _, c := range r.pod.Spec.InitContainers {
		r.containers = append(r.containers, &containerState{spec: c, init: true, waiting: "PodInitializing"})
	}
	for _, c := range r.pod.Spec.Containers {
		r.containers = append(r.containers, &containerState{spec: c, waiting: "PodInitializing"})
	}
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		r.run(ctx)
	}()
}

func (r *podRunner) run(ctx context.Context) {
	logger := klog.FromContext(ctx).WithValues("pod", r.pod.Namespace+"/"+r.pod.Name)
	for _, cs := range r.containers {
		if !cs.init {
			continue
		}
		// An init container that fails is run again until it succeeds.
		backoff := firstBackoff
		for {
			code, err := r.runOnce(ctx, cs)
			if ctx.Err() != nil {
				return
			}
			if err == nil && code == 0 {
				r.update(func() { cs.completed = true })
				break
			}
			logger.Info("init container failed; retrying", "container", cs.spec.Name, "exitCode", code, "err", err, "backoff", backoff)
			if !r.backoff(ctx, cs, &backoff, 0) {
				return
			}
		}
	}
	r.update(func() { r.initialized = true })
	for _, cs := range r.containers {
		if cs.init {
			continue
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.supervise(ctx, cs)
		}()
	}
}

// supervise keeps one container running until the pod stops.
func (r *podRunner) supervise(ctx context.Context, cs *containerState) {
	logger := klog.FromContext(ctx).WithValues("pod", r.pod.Namespace+"/"+r.pod.Name, "container", cs.spec.Name)
	backoff := firstBackoff
	for {
		began := time.Now()
		runCtx, stopProbes := context.WithCancel(ctx)
		code, err := r.runOnce(runCtx, cs)
		stopProbes()
		if ctx.Err() != nil || r.isStopping() {
			return
		}
		logger.Info("container exited; restarting", "exitCode", code, "err", err, "backoff", backoff)
		if !r.backoff(ctx, cs, &backoff, time.Since(began)) {
			return
		}
	}
}

// backoff waits before the next run of a container that exited.
func (r *podRunner) backoff(ctx context.Context, cs *containerState, delay *time.Duration, ran time.Duration) bool {
	if ran > resetAfter {
		*delay = firstBackoff
	}
	r.update(func() {
		cs.restarts++
		cs.waiting = "CrashLoopBackOff"
	})
	select {
	case <-ctx.Done():
		return false
	case <-time.After(*delay):
	}
	*delay = min(2**delay, maxBackoff)
	return true
}

// runOnce runs the container until it exits and returns its exit code. For
// regular containers it also runs the probes of this run.
func (r *podRunner) runOnce(ctx context.Context, cs *containerState) (int, error) {
	if err := r.waitEnabled(ctx); err != nil {
		return -1, err
	}
	cmd, err := r.command(cs.spec)
	if err != nil {
		return -1, err
	}
	logf, err := os.OpenFile(filepath.Join(r.logDir, fmt.Sprintf("%s_%s_%s_%s.log", r.node.Name, r.pod.Namespace, r.pod.Name, cs.spec.Name)), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return -1, err
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	r.mu.Lock()
	if r.stopping {
		r.mu.Unlock()
		return -1, errors.New("pod is stopping")
	}
	err = cmd.Start()
	exited := make(chan struct{})
	if err == nil {
		cs.proc, cs.started, cs.waiting, cs.ready = cmd.Process, time.Now(), "", false
		cs.kill = func() { _ = cmd.Process.Signal(syscall.SIGKILL) }
		cs.exited = exited
	}
	r.mu.Unlock()
	if err != nil {
		return -1, fmt.Errorf("starting container %s: %w", cs.spec.Name, err)
	}
	defer close(exited)
	r.notify()
	if !cs.init {
		r.startProbes(ctx, cs)
	}
	err = cmd.Wait()
	code := cmd.ProcessState.ExitCode()
	reason := "Completed"
	if code != 0 {
		reason = "Error"
	}
	r.update(func() {
		cs.proc, cs.ready, cs.kill = nil, false, nil
		cs.last = &corev1.ContainerStateTerminated{ExitCode: int32(code), Reason: reason,
			StartedAt: metav1.NewTime(cs.started), FinishedAt: metav1.Now(), ContainerID: "lab://" + cs.spec.Name}
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			cs.last.Signal = int32(ws.Signal())
			cs.last.ExitCode = 128 + int32(ws.Signal())
			cs.last.Reason = "Error"
		}
	})
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		err = nil
	}
	return code, err
}

// waitEnabled holds a container back while tests keep the node's agent
// down.
func (r *podRunner) waitEnabled(ctx context.Context) error {
	for {
		if _, err := os.Stat(r.disabled); err != nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// command writes the container's spec and builds the process that becomes
// the container: `sluicectl lab container-init` in a new mount namespace.
func (r *podRunner) command(c corev1.Container) (*exec.Cmd, error) {
	env, err := r.env(c)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", c.Name, err)
	}
	mounts, err := r.mounts(c)
	if err != nil {
		return nil, fmt.Errorf("container %s: %w", c.Name, err)
	}
	vars := envVars(env)
	var argv []string
	for _, a := range c.Command {
		argv = append(argv, expand(a, vars))
	}
	if len(c.Command) == 0 {
		argv = append(argv, imageEntrypoint...)
	}
	for _, a := range c.Args {
		argv = append(argv, expand(a, vars))
	}
	if v := os.Getenv("SLUICE_LAB_AGENT_V"); v != "" && filepath.Base(argv[0]) == "sluiced" {
		// The one change to the manifest's command: log verbosity of the
		// lab's agents, for debugging.
		argv = append(argv, "-v="+v)
	}
	scratch := filepath.Join(r.dir, c.Name+".root")
	if err := os.MkdirAll(scratch, 0o700); err != nil {
		return nil, err
	}
	spec := container.Spec{Scratch: scratch, Image: r.image, Mounts: mounts, Argv: argv, Env: env, Dir: c.WorkingDir}
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, err
	}
	specPath := filepath.Join(r.dir, c.Name+".json")
	if err := lab.WriteFileAtomic(specPath, b, 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command(r.sluicec, "lab", "container-init", "--spec", specPath)
	cmd.SysProcAttr = &syscall.SysProcAttr{
		// Go makes / recursively private in the new mount namespace, so
		// nothing the container mounts reaches the node.
		Unshareflags: syscall.CLONE_NEWNS,
		// A container must not outlive a crashed kubelet: the next one
		// starts the pod afresh.
		Pdeathsig: syscall.SIGKILL,
	}
	return cmd, nil
}

// update changes container state under the lock and reports the change.
func (r *podRunner) update(fn func()) {
	r.mu.Lock()
	fn()
	r.mu.Unlock()
	r.notify()
}

func (r *podRunner) isStopping() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.stopping
}

// stop sends SIGTERM to every running container, and SIGKILL to those still
// running after grace, then waits for the runner to finish. Once stopping,
// no container starts again.
func (r *podRunner) stop(grace time.Duration) {
	r.mu.Lock()
	r.stopping = true
	type running struct {
		proc   *os.Process
		exited chan struct{}
	}
	var procs []running
	for _, cs := range r.containers {
		if cs.proc != nil {
			procs = append(procs, running{cs.proc, cs.exited})
		}
	}
	r.mu.Unlock()
	for _, p := range procs {
		_ = p.proc.Signal(syscall.SIGTERM)
	}
	timer := time.NewTimer(grace)
	defer timer.Stop()
	expired := false
	for _, p := range procs {
		if !expired {
			select {
			case <-p.exited:
				continue
			case <-timer.C:
				expired = true
			}
		}
		_ = p.proc.Signal(syscall.SIGKILL)
	}
	r.cancel()
	r.wg.Wait()
}

// snapshot returns the pod's status as the runner sees it.
func (r *podRunner) snapshot() (initialized bool, init, regular []corev1.ContainerStatus) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, cs := range r.containers {
		st := corev1.ContainerStatus{
			Name:         cs.spec.Name,
			Image:        cs.spec.Image,
			ImageID:      "lab://" + cs.spec.Image,
			RestartCount: cs.restarts,
			Ready:        cs.ready || cs.completed,
		}
		switch {
		case cs.proc != nil:
			st.ContainerID = fmt.Sprintf("lab://%d", cs.proc.Pid)
			st.State.Running = &corev1.ContainerStateRunning{StartedAt: metav1.NewTime(cs.started)}
			st.Started = ptrTo(true)
		case cs.completed:
			st.State.Terminated = cs.last
			st.Started = ptrTo(false)
		default:
			st.State.Waiting = &corev1.ContainerStateWaiting{Reason: cs.waiting}
			st.Started = ptrTo(false)
		}
		if cs.last != nil && !cs.completed {
			st.LastTerminationState.Terminated = cs.last
		}
		if cs.init {
			init = append(init, st)
		} else {
			regular = append(regular, st)
		}
	}
	return r.initialized, init, regular
}

func ptrTo[T any](v T) *T { return &v }
