package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/remotecommand"
	utilexec "k8s.io/client-go/util/exec"

	"github.com/sluice-net/sluice/policy"
)

// probeMatrixThroughAPI tries every pair of a matrix by exec into the
// source pod, as the public conformance suites do: `/agnhost connect`
// (tcp, udp or sctp), else `nc`. It needs get on the pods and create
// pods/exec in their namespaces. A pair whose pod has neither tool is
// left out (no cell is marked) and reported, never guessed.
func probeMatrixThroughAPI(ctx context.Context, a *agentAccess, m *policy.Matrix) (map[[2]string]bool, error) {
	cs, _, err := a.api.load()
	if err != nil {
		return nil, err
	}
	ips := map[string]string{}
	for _, ref := range m.Pods {
		namespace, name, _ := strings.Cut(ref, "/")
		p, err := cs.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return nil, forbidden(err, "get", "pods", namespace)
		}
		ips[ref] = p.Status.PodIP
	}
	var mu sync.Mutex
	got := map[[2]string]bool{}
	var firstErr error
	var wg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for _, c := range m.Cells {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			ok, err := a.execConnect(ctx, c.From, ips[c.To], int(m.Port), m.Proto)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = fmt.Errorf("probing %s -> %s: %w", c.From, c.To, err)
				}
				return
			}
			got[[2]string{c.From, c.To}] = ok
		})
	}
	wg.Wait()
	if len(got) == 0 && firstErr != nil {
		return nil, firstErr
	}
	return got, nil
}

// probeTimeout bounds one connection attempt: a policy drop is a timeout.
const probeTimeout = 2 * time.Second

// execConnect reports whether a connection from the pod to ip:port
// succeeded. An error means the probe could not run at all (no tool, no
// RBAC), not that the connection failed.
func (a *agentAccess) execConnect(ctx context.Context, from, ip string, port int, proto policy.Protocol) (bool, error) {
	addr := net.JoinHostPort(ip, strconv.Itoa(port))
	p := strings.ToLower(string(proto))
	attempts := [][]string{
		{"/agnhost", "connect", "--timeout=" + probeTimeout.String(), "--protocol=" + p, addr},
	}
	if p == "tcp" {
		attempts = append(attempts, []string{"nc", "-z", "-w", strconv.Itoa(int(probeTimeout.Seconds())), ip, strconv.Itoa(port)})
	}
	var lastErr error
	for _, argv := range attempts {
		exit, stderr, err := a.exec(ctx, from, argv)
		if err != nil {
			return false, err
		}
		if exit == 0 {
			return true, nil
		}
		// 126/127, or the runtime's "executable file not found": try
		// the next tool.
		if exit == 126 || exit == 127 || strings.Contains(stderr, "not found") || strings.Contains(stderr, "no such file") {
			lastErr = fmt.Errorf("%s: %s", argv[0], strings.TrimSpace(stderr))
			continue
		}
		return false, nil
	}
	return false, fmt.Errorf("the pod has no tool to probe with (agnhost or nc): %w", lastErr)
}

// exec runs argv in the first container of a pod and returns its exit
// code and standard error.
func (a *agentAccess) exec(ctx context.Context, ref string, argv []string) (int, string, error) {
	cs, cfg, err := a.api.load()
	if err != nil {
		return 0, "", err
	}
	namespace, name, _ := strings.Cut(ref, "/")
	req := cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(namespace).Name(name).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Command: argv, Stdout: true, Stderr: true}, execParameterCodec)
	ex, err := remotecommand.NewSPDYExecutor(cfg, "POST", req.URL())
	if err != nil {
		return 0, "", err
	}
	var stdout, stderr bytes.Buffer
	err = ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr})
	if code, ok := exitStatus(err); ok {
		return code, stderr.String(), nil
	}
	if err != nil {
		return 0, stderr.String(), forbidden(fmt.Errorf("exec in %s: %w", ref, err), "create", "pods/exec", namespace)
	}
	return 0, stderr.String(), nil
}

var execParameterCodec = scheme.ParameterCodec

// exitStatus is the remote command's exit code when err says it exited
// with one.
func exitStatus(err error) (int, bool) {
	var ee utilexec.ExitError
	if errors.As(err, &ee) && ee.Exited() {
		return ee.ExitStatus(), true
	}
	return 0, false
}
