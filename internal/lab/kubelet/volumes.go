package kubelet

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/internal/lab/container"
)

// nodeOwnedPaths are the host paths that are private to a lab node. Only
// under them may a hostPath volume create what is missing; anything else
// would be created on the machine's own filesystem.
var nodeOwnedPaths = []string{"/etc/cni/net.d", "/opt/cni/bin", "/run", "/var/lib"}

func nodeOwned(path string) bool {
	for _, p := range nodeOwnedPaths {
		if path == p || strings.HasPrefix(path, p+"/") {
			return true
		}
	}
	return false
}

// prepareVolumes makes every volume of the pod exist on the node and
// returns each one's source path as the node sees it. ConfigMaps, tokens
// and downward API files are written once, when the pod starts.
func (k *Kubelet) prepareVolumes(ctx context.Context, pod *corev1.Pod, podDir string) (map[string]string, error) {
	sources := map[string]string{}
	for _, v := range pod.Spec.Volumes {
		dir := filepath.Join(podDir, "volumes", v.Name)
		var err error
		switch {
		case v.HostPath != nil:
			sources[v.Name], err = k.hostPath(ctx, pod, v.Name, v.HostPath, podDir)
		case v.ConfigMap != nil:
			var files map[string]string
			if files, err = k.configMapFiles(ctx, pod.Namespace, v.ConfigMap.Name, v.ConfigMap.Items, ptrValue(v.ConfigMap.Optional)); err == nil {
				err = writeFiles(dir, files)
			}
			sources[v.Name] = dir
		case v.Projected != nil:
			err = k.writeProjected(ctx, pod, v.Projected, dir)
			sources[v.Name] = dir
		case v.EmptyDir != nil:
			err = os.MkdirAll(dir, 0o755)
			sources[v.Name] = dir
		default:
			err = errors.New("the lab kubelet supports hostPath, configMap, projected and emptyDir volumes")
		}
		if err != nil {
			return nil, fmt.Errorf("volume %s: %w", v.Name, err)
		}
	}
	return sources, nil
}

func ptrValue(b *bool) bool { return b != nil && *b }

// hostPath checks or creates the path by its type. A missing path outside
// the node's own host paths is replaced by an empty directory of the pod's,
// so the lab never creates anything on the machine itself.
func (k *Kubelet) hostPath(ctx context.Context, pod *corev1.Pod, name string, hp *corev1.HostPathVolumeSource, podDir string) (string, error) {
	typ := corev1.HostPathUnset
	if hp.Type != nil {
		typ = *hp.Type
	}
	_, statErr := os.Stat(hp.Path)
	if statErr == nil {
		return hp.Path, nil
	}
	if !os.IsNotExist(statErr) {
		return "", statErr
	}
	switch typ {
	case corev1.HostPathDirectoryOrCreate, corev1.HostPathFileOrCreate, corev1.HostPathUnset:
	default:
		return "", fmt.Errorf("hostPath %s does not exist (type %s)", hp.Path, typ)
	}
	if !nodeOwned(hp.Path) {
		empty := filepath.Join(podDir, "volumes", name)
		klog.FromContext(ctx).Info("hostPath is missing outside the node's own paths; the container gets an empty directory", "pod", pod.Namespace+"/"+pod.Name, "path", hp.Path)
		return empty, os.MkdirAll(empty, 0o755)
	}
	if typ == corev1.HostPathFileOrCreate {
		if err := os.MkdirAll(filepath.Dir(hp.Path), 0o755); err != nil {
			return "", err
		}
		f, err := os.OpenFile(hp.Path, os.O_CREATE|os.O_WRONLY, 0o644)
		if err != nil {
			return "", err
		}
		return hp.Path, f.Close()
	}
	return hp.Path, os.MkdirAll(hp.Path, 0o755)
}

// configMapFiles reads a ConfigMap's keys (or the listed items) as files.
// The lab kubelet reads it as the node, which the Node authorizer allows
// for ConfigMaps of pods bound to this node.
func (k *Kubelet) configMapFiles(ctx context.Context, namespace, name string, items []corev1.KeyToPath, optional bool) (map[string]string, error) {
	files := map[string]string{}
	cm, err := k.client.CoreV1().ConfigMaps(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		if optional && apierrors.IsNotFound(err) {
			return files, nil
		}
		return nil, fmt.Errorf("reading configmap %s/%s: %w", namespace, name, err)
	}
	if len(items) == 0 {
		for key, val := range cm.Data {
			files[key] = val
		}
	}
	for _, it := range items {
		val, ok := cm.Data[it.Key]
		if !ok {
			return nil, fmt.Errorf("configmap %s/%s has no key %q", namespace, name, it.Key)
		}
		files[it.Path] = val
	}
	return files, nil
}

// writeProjected writes a projected volume: the ServiceAccount token,
// ConfigMap items and downward API files. The admission plugin adds one of
// these (kube-api-access-*) to every pod with the token, ca.crt from
// kube-root-ca.crt and the namespace.
func (k *Kubelet) writeProjected(ctx context.Context, pod *corev1.Pod, p *corev1.ProjectedVolumeSource, dir string) error {
	files := map[string]string{}
	for _, src := range p.Sources {
		switch {
		case src.ServiceAccountToken != nil:
			tok, err := k.podToken(ctx, pod, src.ServiceAccountToken)
			if err != nil {
				return err
			}
			files[src.ServiceAccountToken.Path] = tok
		case src.ConfigMap != nil:
			cm, err := k.configMapFiles(ctx, pod.Namespace, src.ConfigMap.Name, src.ConfigMap.Items, ptrValue(src.ConfigMap.Optional))
			if err != nil {
				return err
			}
			for name, val := range cm {
				files[name] = val
			}
		case src.DownwardAPI != nil:
			for _, it := range src.DownwardAPI.Items {
				if it.FieldRef == nil {
					return fmt.Errorf("downward API item %s: only fieldRef is supported", it.Path)
				}
				val, err := k.fieldValue(pod, it.FieldRef.FieldPath)
				if err != nil {
					return err
				}
				files[it.Path] = val
			}
		default:
			return errors.New("the lab kubelet projects only serviceAccountToken, configMap and downwardAPI")
		}
	}
	return writeFiles(dir, files)
}

// podToken asks the TokenRequest API for a token of the pod's
// ServiceAccount bound to the pod, which the Node authorizer and
// NodeRestriction allow the node to do for its own pods.
func (k *Kubelet) podToken(ctx context.Context, pod *corev1.Pod, src *corev1.ServiceAccountTokenProjection) (string, error) {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	req := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		ExpirationSeconds: src.ExpirationSeconds,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{APIVersion: "v1", Kind: "Pod", Name: pod.Name, UID: pod.UID},
	}}
	if src.Audience != "" {
		req.Spec.Audiences = []string{src.Audience}
	}
	tr, err := k.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("requesting a token for serviceaccount %s/%s: %w", pod.Namespace, sa, err)
	}
	return tr.Status.Token, nil
}

func writeFiles(dir string, files map[string]string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for name, val := range files {
		p := filepath.Join(dir, name)
		if !strings.HasPrefix(p, filepath.Clean(dir)+"/") {
			return fmt.Errorf("file %q escapes its volume", name)
		}
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return err
		}
		if err := lab.WriteFileAtomic(p, []byte(val), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// containerMounts lists the container's volumeMounts with their sources.
func containerMounts(c corev1.Container, sources map[string]string) ([]container.Mount, error) {
	var mounts []container.Mount
	for _, vm := range c.VolumeMounts {
		src, ok := sources[vm.Name]
		if !ok {
			return nil, fmt.Errorf("volumeMount %s names no volume", vm.Name)
		}
		if vm.SubPath != "" {
			src = filepath.Join(src, vm.SubPath)
		}
		mounts = append(mounts, container.Mount{Source: src, Target: vm.MountPath, ReadOnly: vm.ReadOnly})
	}
	return mounts, nil
}
