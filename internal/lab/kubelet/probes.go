package kubelet

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/klog/v2"
)

// startProbes runs the container's readiness and liveness probes for one
// run of it. Probes run from the kubelet, which sits in the node's network
// namespace: the namespace of the hostNetwork pods it runs.
func (r *podRunner) startProbes(ctx context.Context, cs *containerState) {
	if p := cs.spec.ReadinessProbe; p != nil {
		go r.probeLoop(ctx, cs, p, func(ok bool) {
			r.mu.Lock()
			changed := cs.ready != ok && cs.proc != nil
			if changed {
				cs.ready = ok
			}
			r.mu.Unlock()
			if changed {
				r.notify()
			}
		})
	} else {
		// Without a readiness probe a running container is ready.
		r.update(func() { cs.ready = cs.proc != nil })
	}
	if p := cs.spec.LivenessProbe; p != nil {
		go r.probeLoop(ctx, cs, p, func(ok bool) {
			if ok {
				return
			}
			klog.FromContext(ctx).Info("liveness probe failed; killing the container", "pod", r.pod.Namespace+"/"+r.pod.Name, "container", cs.spec.Name)
			r.mu.Lock()
			kill := cs.kill
			r.mu.Unlock()
			if kill != nil {
				kill()
			}
		})
	}
}

// probeLoop probes every period and reports a result once the success or
// failure threshold is met, as the kubelet's prober does.
func (r *podRunner) probeLoop(ctx context.Context, cs *containerState, p *corev1.Probe, report func(ok bool)) {
	period := seconds(p.PeriodSeconds, 10)
	timeout := seconds(p.TimeoutSeconds, 1)
	successes, failures := 0, 0
	needSuccess, needFailure := int(max(p.SuccessThreshold, 1)), int(max(p.FailureThreshold, 1))
	if p.FailureThreshold == 0 {
		needFailure = 3
	}
	select {
	case <-ctx.Done():
		return
	case <-time.After(time.Duration(p.InitialDelaySeconds) * time.Second):
	}
	tick := time.NewTicker(period)
	defer tick.Stop()
	for {
		err := r.probeOnce(ctx, cs.spec, p, timeout)
		if err == nil {
			successes, failures = successes+1, 0
			if successes >= needSuccess {
				report(true)
			}
		} else {
			successes, failures = 0, failures+1
			klog.FromContext(ctx).V(2).Info("probe failed", "pod", r.pod.Namespace+"/"+r.pod.Name, "container", cs.spec.Name, "err", err)
			if failures >= needFailure {
				report(false)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

func seconds(v, def int32) time.Duration {
	if v <= 0 {
		v = def
	}
	return time.Duration(v) * time.Second
}

func (r *podRunner) probeOnce(ctx context.Context, c corev1.Container, p *corev1.Probe, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch {
	case p.HTTPGet != nil:
		g := p.HTTPGet
		port, err := probePort(c, g.Port)
		if err != nil {
			return err
		}
		host := g.Host
		if host == "" {
			host = r.node.IP4 // a hostNetwork pod's IP
		}
		scheme := strings.ToLower(string(g.Scheme))
		if scheme == "" {
			scheme = "http"
		}
		path := g.Path
		if !strings.HasPrefix(path, "/") {
			path = "/" + path
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s://%s%s", scheme, net.JoinHostPort(host, strconv.Itoa(port)), path), nil)
		if err != nil {
			return err
		}
		for _, h := range g.HTTPHeaders {
			req.Header.Add(h.Name, h.Value)
		}
		// The kubelet does not verify probe certificates either.
		client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, DisableKeepAlives: true}}
		resp, err := client.Do(req)
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode < 200 || resp.StatusCode >= 400 {
			return fmt.Errorf("HTTP probe %s: %s", req.URL, resp.Status)
		}
		return nil
	case p.TCPSocket != nil:
		port, err := probePort(c, p.TCPSocket.Port)
		if err != nil {
			return err
		}
		host := p.TCPSocket.Host
		if host == "" {
			host = r.node.IP4
		}
		conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	default:
		return fmt.Errorf("the lab kubelet runs only httpGet and tcpSocket probes")
	}
}

// probePort resolves a port number or a named container port.
func probePort(c corev1.Container, port intstr.IntOrString) (int, error) {
	if port.Type == intstr.Int {
		return port.IntValue(), nil
	}
	for _, p := range c.Ports {
		if p.Name == port.StrVal {
			return int(p.ContainerPort), nil
		}
	}
	return 0, fmt.Errorf("container %s has no port named %q", c.Name, port.StrVal)
}
