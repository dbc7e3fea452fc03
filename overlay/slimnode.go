package overlay

import (
	corev1 "k8s.io/api/core/v1"
)

// slimNode is the transform of the overlay's Node informer: it drops the
// parts of a Node that are large on real nodes and that nothing in the
// overlay reads, before the Node enters the cache. A kubelet's Node carries
// its image list (up to 50 images with every tag and digest) and the
// managed fields of every writer, several KiB each; every agent caches every
// Node, so at 5,000 nodes that is tens of MB per agent. Everything else is
// kept: the own Node's status is read more widely than peers'.
func slimNode(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil
	}
	n.ManagedFields = nil
	n.Status.Images = nil
	n.Status.VolumesInUse = nil
	n.Status.VolumesAttached = nil
	return n, nil
}
