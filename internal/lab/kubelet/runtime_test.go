package kubelet

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/internal/lab/container"
)

func TestIsSluiceImage(t *testing.T) {
	for image, want := range map[string]bool{
		"ghcr.io/sluice-net/sluice":                 true,
		"ghcr.io/sluice-net/sluice:v0.1.0":          true,
		"ghcr.io/sluice-net/sluice:v0.1.1-rolling":  true,
		"ghcr.io/sluice-net/sluice@sha256:0123abcd": true,
		"ghcr.io/sluice-net/sluice-debug:v0.1.0":    false,
		"ghcr.io/sluice-net/sluicex":                false,
		"docker.io/flannel/flannel:v0.28.10":        false,
		"lab":                                       false,
	} {
		if got := isSluiceImage(image); got != want {
			t.Errorf("isSluiceImage(%q) = %v, want %v", image, got, want)
		}
	}
}

func TestRunsAsProcessesOnlyHostNetworkSluicePodsInSluiceLabs(t *testing.T) {
	pod := func(hostNetwork bool, images ...string) *corev1.Pod {
		p := &corev1.Pod{Spec: corev1.PodSpec{HostNetwork: hostNetwork}}
		p.Spec.InitContainers = []corev1.Container{{Image: images[0]}}
		for _, img := range images[1:] {
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Image: img})
		}
		return p
	}
	const img = SluiceImage + ":v0.1.0"
	manifest := &Kubelet{lab: &lab.State{CNI: lab.CNIManifest}}
	sluice := &Kubelet{lab: &lab.State{CNI: lab.CNISluice}}
	other := &Kubelet{lab: &lab.State{CNI: lab.CNIReference}}
	for _, c := range []struct {
		k    *Kubelet
		pod  *corev1.Pod
		want bool
	}{
		{manifest, pod(true, img, img), true},
		{sluice, pod(true, img, img), true},
		{manifest, pod(false, img, img), false},
		{manifest, pod(true, img, "busybox"), false},
		{manifest, pod(true, "busybox", img), false},
		// Other labs keep standing in for every pod, so applying the
		// manifest there starts no agent.
		{other, pod(true, img, img), false},
	} {
		if got := c.k.runsAsProcesses(c.pod); got != c.want {
			t.Errorf("lab %s, pod %+v: %v, want %v", c.k.lab.CNI, c.pod.Spec, got, c.want)
		}
	}
}

func TestNodeOwned(t *testing.T) {
	for path, want := range map[string]bool{
		"/run/sluice":       true,
		"/run/xtables.lock": true,
		"/var/lib/sluice":   true,
		"/opt/cni/bin":      true,
		"/etc/cni/net.d":    true,
		"/lib/modules":      false,
		"/runner":           false,
		"/var/library":      false,
		"/etc":              false,
	} {
		if got := nodeOwned(path); got != want {
			t.Errorf("nodeOwned(%q) = %v, want %v", path, got, want)
		}
	}
}

func TestContainerEnvResolvesFieldRefs(t *testing.T) {
	k := &Kubelet{lab: &lab.State{ControlIP4: "198.18.0.2"}, node: lab.Node{Name: "node-2", IP4: "198.18.0.12"}}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "kube-system", Name: "sluice-x", UID: "u1"}, Spec: corev1.PodSpec{ServiceAccountName: "sluice"}}
	field := func(path string) *corev1.EnvVarSource {
		return &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: path}}
	}
	c := corev1.Container{Env: []corev1.EnvVar{
		{Name: "NODE_NAME", ValueFrom: field("spec.nodeName")},
		{Name: "POD", ValueFrom: field("metadata.name")},
		{Name: "NS", ValueFrom: field("metadata.namespace")},
		{Name: "HOST_IP", ValueFrom: field("status.hostIP")},
		{Name: "POD_IP", ValueFrom: field("status.podIP")},
		{Name: "PLAIN", Value: "v"},
	}}
	env, err := k.containerEnv(pod, c)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"KUBERNETES_SERVICE_HOST=198.18.0.2", "KUBERNETES_SERVICE_PORT=6443",
		"NODE_NAME=node-2", "POD=sluice-x", "NS=kube-system", "HOST_IP=198.18.0.12", "POD_IP=198.18.0.12", "PLAIN=v",
	} {
		if !slices.Contains(env, want) {
			t.Errorf("env lacks %s: %v", want, env)
		}
	}
	c.Env = []corev1.EnvVar{{Name: "X", ValueFrom: field("metadata.labels['a']")}}
	if _, err := k.containerEnv(pod, c); err == nil {
		t.Error("an unsupported fieldRef was accepted")
	}
	c.Env = []corev1.EnvVar{{Name: "X", ValueFrom: &corev1.EnvVarSource{SecretKeyRef: &corev1.SecretKeySelector{Key: "k"}}}}
	if _, err := k.containerEnv(pod, c); err == nil {
		t.Error("a secretKeyRef was accepted")
	}
}

func TestContainerMounts(t *testing.T) {
	sources := map[string]string{"config": "/tmp/pod/volumes/config", "cni-bin": "/opt/cni/bin"}
	c := corev1.Container{VolumeMounts: []corev1.VolumeMount{
		{Name: "config", MountPath: "/etc/sluice", ReadOnly: true},
		{Name: "cni-bin", MountPath: "/host/opt/cni/bin"},
		{Name: "config", MountPath: "/etc/net-conf.json", SubPath: "net-conf.json"},
	}}
	got, err := containerMounts(c, sources)
	if err != nil {
		t.Fatal(err)
	}
	want := []container.Mount{
		{Source: "/tmp/pod/volumes/config", Target: "/etc/sluice", ReadOnly: true},
		{Source: "/opt/cni/bin", Target: "/host/opt/cni/bin"},
		{Source: "/tmp/pod/volumes/config/net-conf.json", Target: "/etc/net-conf.json"},
	}
	if !slices.Equal(got, want) {
		t.Errorf("mounts\n got %+v\nwant %+v", got, want)
	}
	c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "missing", MountPath: "/x"})
	if _, err := containerMounts(c, sources); err == nil {
		t.Error("a mount of a missing volume was accepted")
	}
}

func TestWriteFilesStaysInItsVolume(t *testing.T) {
	dir := t.TempDir()
	if err := writeFiles(dir, map[string]string{"a": "1", "sub/b": "2"}); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(dir, "sub", "b")); err != nil || string(b) != "2" {
		t.Errorf("sub/b = %q, %v", b, err)
	}
	if err := writeFiles(filepath.Join(dir, "v"), map[string]string{"../escaped": "x"}); err == nil {
		t.Error("a key escaping the volume was written")
	}
}

func TestProbePort(t *testing.T) {
	c := corev1.Container{Name: "c", Ports: []corev1.ContainerPort{{Name: "health", ContainerPort: 9098}}}
	if p, err := probePort(c, intstr.FromInt32(80)); err != nil || p != 80 {
		t.Errorf("port 80: %d %v", p, err)
	}
	if p, err := probePort(c, intstr.FromString("health")); err != nil || p != 9098 {
		t.Errorf("named port: %d %v", p, err)
	}
	if _, err := probePort(c, intstr.FromString("nope")); err == nil {
		t.Error("an unknown named port was accepted")
	}
}

func TestSameStatusSeesRestartsAndReadiness(t *testing.T) {
	base := corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "1.2.3.4", PodIPs: []corev1.PodIP{{IP: "1.2.3.4"}},
		Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}},
		ContainerStatuses: []corev1.ContainerStatus{{Name: "c", Ready: true, ContainerID: "lab://1",
			State: corev1.ContainerState{Running: &corev1.ContainerStateRunning{}}}}}
	if !sameStatus(base, *base.DeepCopy()) {
		t.Error("a copy differs")
	}
	restarted := base.DeepCopy()
	restarted.ContainerStatuses[0].RestartCount = 1
	restarted.ContainerStatuses[0].ContainerID = "lab://2"
	unready := base.DeepCopy()
	unready.Conditions[0].Status = corev1.ConditionFalse
	for name, st := range map[string]*corev1.PodStatus{"restarted": restarted, "unready": unready} {
		if sameStatus(base, *st) {
			t.Errorf("%s: no change seen", name)
		}
	}
}

func TestExpandLikeKubernetes(t *testing.T) {
	vars := map[string]string{"NODE_NAME": "node-1", "EMPTY": ""}
	for in, want := range map[string]string{
		"--node=$(NODE_NAME)":   "--node=node-1",
		"$(NODE_NAME)$(EMPTY)x": "node-1x",
		"$(UNDEFINED)":          "$(UNDEFINED)",
		"$$(NODE_NAME)":         "$(NODE_NAME)",
		"cost: $5":              "cost: $5",
		"$(NODE_NAME":           "$(NODE_NAME",
		"trailing $":            "trailing $",
	} {
		if got := expand(in, vars); got != want {
			t.Errorf("expand(%q) = %q, want %q", in, got, want)
		}
	}
	k := &Kubelet{lab: &lab.State{ControlIP4: "198.18.0.2"}, node: lab.Node{Name: "node-2"}}
	env, err := k.containerEnv(&corev1.Pod{}, corev1.Container{Env: []corev1.EnvVar{
		{Name: "A", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "spec.nodeName"}}},
		{Name: "B", Value: "$(A)-$(KUBERNETES_SERVICE_HOST)-$(C)"},
		{Name: "C", Value: "late"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(env, "B=node-2-198.18.0.2-$(C)") {
		t.Errorf("env %v: B refers to earlier variables only", env)
	}
}
