package kubelet

import (
	"context"
	"fmt"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"
)

const leaseDurationSeconds = 40

// register creates the Node if it does not exist and reports its status.
func (k *Kubelet) register(ctx context.Context) error {
	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{
		Name: k.node.Name,
		Labels: map[string]string{
			"kubernetes.io/hostname": k.node.Name,
			"kubernetes.io/os":       "linux",
			"kubernetes.io/arch":     "amd64",
		},
	}}
	deadline := time.Now().Add(time.Minute)
	for {
		_, err := k.client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{})
		if err == nil || apierrors.IsAlreadyExists(err) {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("registering node %s: %w", k.node.Name, err)
		}
		klog.FromContext(ctx).Info("registering node failed; retrying", "err", err)
		time.Sleep(time.Second)
	}
	if err := k.updateStatus(ctx); err != nil {
		return err
	}
	k.renewLease(ctx)
	return nil
}

func (k *Kubelet) reportStatus(ctx context.Context) {
	if err := k.updateStatus(ctx); err != nil {
		klog.FromContext(ctx).Error(err, "updating node status")
	}
}

// updateStatus writes addresses, capacity and a Ready condition. Conditions
// that other components own (NetworkUnavailable, set by a network plugin)
// are kept.
func (k *Kubelet) updateStatus(ctx context.Context) error {
	for attempt := 0; attempt < 5; attempt++ {
		node, err := k.client.CoreV1().Nodes().Get(ctx, k.node.Name, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("reading node: %w", err)
		}
		now := metav1.Now()
		node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: k.node.IP4}}
		if k.node.IP6 != "" && k.lab.IPv6 {
			node.Status.Addresses = append(node.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeInternalIP, Address: k.node.IP6})
		}
		node.Status.Addresses = append(node.Status.Addresses, corev1.NodeAddress{Type: corev1.NodeHostName, Address: k.node.Name})
		capacity := corev1.ResourceList{
			corev1.ResourceCPU:              resource.MustParse("2"),
			corev1.ResourceMemory:           resource.MustParse("8Gi"),
			corev1.ResourcePods:             resource.MustParse("250"),
			corev1.ResourceEphemeralStorage: resource.MustParse("50Gi"),
		}
		node.Status.Capacity, node.Status.Allocatable = capacity, capacity
		node.Status.NodeInfo = corev1.NodeSystemInfo{
			KubeletVersion:          "v1.36.3",
			OperatingSystem:         "linux",
			Architecture:            "amd64",
			ContainerRuntimeVersion: "sluice-lab://1",
			OSImage:                 "sluice lab node",
		}
		setCondition(node, corev1.NodeCondition{Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady", Message: "lab kubelet is posting ready status"}, now)
		for _, t := range []corev1.NodeConditionType{corev1.NodeMemoryPressure, corev1.NodeDiskPressure, corev1.NodePIDPressure} {
			setCondition(node, corev1.NodeCondition{Type: t, Status: corev1.ConditionFalse, Reason: "KubeletHasSufficient" + string(t)}, now)
		}
		_, err = k.client.CoreV1().Nodes().UpdateStatus(ctx, node, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			continue
		}
		if err != nil {
			return fmt.Errorf("updating node status: %w", err)
		}
		return nil
	}
	return fmt.Errorf("updating node status: too many conflicts")
}

func setCondition(node *corev1.Node, c corev1.NodeCondition, now metav1.Time) {
	c.LastHeartbeatTime = now
	for i := range node.Status.Conditions {
		if node.Status.Conditions[i].Type == c.Type {
			if node.Status.Conditions[i].Status != c.Status {
				c.LastTransitionTime = now
			} else {
				c.LastTransitionTime = node.Status.Conditions[i].LastTransitionTime
			}
			node.Status.Conditions[i] = c
			return
		}
	}
	c.LastTransitionTime = now
	node.Status.Conditions = append(node.Status.Conditions, c)
}

// renewLease keeps the node's Lease in kube-node-lease fresh, which is how
// the node lifecycle controller knows the node is alive.
func (k *Kubelet) renewLease(ctx context.Context) {
	leases := k.client.CoordinationV1().Leases(corev1.NamespaceNodeLease)
	now := metav1.NewMicroTime(time.Now())
	lease, err := leases.Get(ctx, k.node.Name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		lease = &coordinationv1.Lease{
			ObjectMeta: metav1.ObjectMeta{Name: k.node.Name, Namespace: corev1.NamespaceNodeLease},
			Spec: coordinationv1.LeaseSpec{
				HolderIdentity:       ptr.To(k.node.Name),
				LeaseDurationSeconds: ptr.To[int32](leaseDurationSeconds),
				RenewTime:            &now,
			},
		}
		if node, err := k.client.CoreV1().Nodes().Get(ctx, k.node.Name, metav1.GetOptions{}); err == nil {
			lease.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}}
		}
		_, err = leases.Create(ctx, lease, metav1.CreateOptions{})
		if err != nil {
			klog.FromContext(ctx).Error(err, "creating node lease")
		}
		return
	}
	if err != nil {
		klog.FromContext(ctx).Error(err, "reading node lease")
		return
	}
	lease.Spec.RenewTime = &now
	if _, err := leases.Update(ctx, lease, metav1.UpdateOptions{}); err != nil {
		klog.FromContext(ctx).Error(err, "renewing node lease")
	}
}
