package kubelet

import (
	"errors"
	"fmt"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// fieldValue resolves a downward API field of a hostNetwork pod on this
// node.
func (k *Kubelet) fieldValue(pod *corev1.Pod, path string) (string, error) {
	switch path {
	case "spec.nodeName":
		return k.node.Name, nil
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.hostIP", "status.podIP":
		return k.node.IP4, nil
	}
	return "", fmt.Errorf("the lab kubelet cannot resolve fieldRef %q", path)
}

// containerEnv is the container's environment: the image's PATH, what the
// kubelet adds for in-cluster clients, and the manifest's env with fieldRefs
// resolved. The API server is reached at its underlay address, because the
// lab has no kube-proxy for the kubernetes Service.
func (k *Kubelet) containerEnv(pod *corev1.Pod, c corev1.Container) ([]string, error) {
	host, port := k.lab.ControlIP4, "6443"
	env := []string{
		"PATH=" + imagePath,
		"HOSTNAME=" + k.node.Name,
		"KUBERNETES_SERVICE_HOST=" + host,
		"KUBERNETES_SERVICE_PORT=" + port,
		"KUBERNETES_SERVICE_PORT_HTTPS=" + port,
		"KUBERNETES_PORT=tcp://" + host + ":" + port,
	}
	vars := envVars(env)
	if len(c.EnvFrom) > 0 {
		return nil, errors.New("the lab kubelet does not support envFrom")
	}
	for _, e := range c.Env {
		val := e.Value
		if e.ValueFrom != nil {
			if e.ValueFrom.FieldRef == nil {
				return nil, fmt.Errorf("env %s: only fieldRef is supported in valueFrom", e.Name)
			}
			var err error
			if val, err = k.fieldValue(pod, e.ValueFrom.FieldRef.FieldPath); err != nil {
				return nil, fmt.Errorf("env %s: %w", e.Name, err)
			}
		}
		val = expand(val, vars)
		vars[e.Name] = val
		env = append(env, e.Name+"="+val)
	}
	return env, nil
}

// expand replaces $(NAME) with the variable's value as Kubernetes does in
// env values, command and args: an undefined NAME stays as written, and
// $$ is an escaped $.
func expand(s string, vars map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '$' || i+1 == len(s) {
			b.WriteByte(s[i])
			continue
		}
		switch s[i+1] {
		case '$':
			b.WriteByte('$')
			i++
			continue
		case '(':
			if end := strings.IndexByte(s[i+2:], ')'); end >= 0 {
				name := s[i+2 : i+2+end]
				if val, ok := vars[name]; ok {
					b.WriteString(val)
					i += end + 2
					continue
				}
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// envVars maps an environment list to its values.
func envVars(env []string) map[string]string {
	vars := map[string]string{}
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok {
			vars[k] = v
		}
	}
	return vars
}
