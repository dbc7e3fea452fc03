package policy

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/cni/endpointapi"
)

// slimObject is the transform of the loop's informers: it keeps of each
// object what the loop reads, before the object enters the cache. At
// 50,000 pods the informer cache held every pod's full spec, status and
// managed fields, a few KiB each, for the dozen fields policy reads;
// trimmed, the cache is a fraction of that and each pod's model is made
// from a small object. The object must keep its identity (namespace,
// name, UID, resourceVersion), which the cache keys, the model's version
// check and Events use.
func slimObject(obj any) (any, error) {
	switch o := obj.(type) {
	case *corev1.Pod:
		return slimPod(o), nil
	case *corev1.Namespace:
		return &corev1.Namespace{TypeMeta: o.TypeMeta, ObjectMeta: slimMeta(o.ObjectMeta, nil)}, nil
	case *corev1.ServiceAccount:
		return &corev1.ServiceAccount{TypeMeta: o.TypeMeta, ObjectMeta: slimMeta(o.ObjectMeta, nil)}, nil
	case *corev1.Node:
		// ClusterNetworkPolicy node peers read its name, labels and
		// addresses (convertNode).
		return &corev1.Node{TypeMeta: o.TypeMeta, ObjectMeta: slimMeta(o.ObjectMeta, nil),
			Status: corev1.NodeStatus{Addresses: o.Status.Addresses}}, nil
	}
	// Policies keep everything but the managed fields: their spec is
	// what the loop converts, and Events name them.
	if m, err := meta.Accessor(obj); err == nil {
		m.SetManagedFields(nil)
	}
	return obj, nil
}

// slimMeta keeps an object's identity, labels and the named annotations.
func slimMeta(m metav1.ObjectMeta, annotations []string) metav1.ObjectMeta {
	out := metav1.ObjectMeta{Name: m.Name, Namespace: m.Namespace, UID: m.UID, ResourceVersion: m.ResourceVersion,
		Generation: m.Generation, Labels: m.Labels, DeletionTimestamp: m.DeletionTimestamp}
	for _, a := range annotations {
		if v, ok := m.Annotations[a]; ok {
			if out.Annotations == nil {
				out.Annotations = map[string]string{}
			}
			out.Annotations[a] = v
		}
	}
	return out
}

// slimPod keeps what modelPod and the admission check read: identity,
// labels, the registry's IP annotation, node, host networking, service
// account, named container ports, phase and IPs.
func slimPod(p *corev1.Pod) *corev1.Pod {
	out := &corev1.Pod{TypeMeta: p.TypeMeta, ObjectMeta: slimMeta(p.ObjectMeta, []string{endpointapi.PodIPsAnnotation}),
		Spec:   corev1.PodSpec{NodeName: p.Spec.NodeName, HostNetwork: p.Spec.HostNetwork, ServiceAccountName: p.Spec.ServiceAccountName},
		Status: corev1.PodStatus{Phase: p.Status.Phase, PodIP: p.Status.PodIP, PodIPs: p.Status.PodIPs}}
	for _, c := range p.Spec.Containers {
		var named []corev1.ContainerPort
		for _, port := range c.Ports {
			if port.Name != "" {
				named = append(named, corev1.ContainerPort{Name: port.Name, ContainerPort: port.ContainerPort, Protocol: port.Protocol})
			}
		}
		if len(named) > 0 {
			out.Spec.Containers = append(out.Spec.Containers, corev1.Container{Name: c.Name, Ports: named})
		}
	}
	return out
}
