package overlay

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestSlimNodeKeepsWhatTheOverlayReads(t *testing.T) {
	n := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: "node-2", ResourceVersion: "7", Labels: map[string]string{"zone": "a"},
			Annotations:   map[string]string{"flannel.alpha.coreos.com/public-ip": "192.0.2.2"},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}},
		Spec: corev1.NodeSpec{PodCIDR: "10.244.2.0/24", PodCIDRs: []string{"10.244.2.0/24", "fd00:10:244:2::/64"}},
		Status: corev1.NodeStatus{
			Addresses:  []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.0.2.2"}},
			Conditions: []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue}},
			Images:     []corev1.ContainerImage{{Names: []string{"registry.k8s.io/pause:3.10"}, SizeBytes: 1}},
		},
	}
	out, err := slimNode(n)
	if err != nil {
		t.Fatal(err)
	}
	s := out.(*corev1.Node)
	if s.ManagedFields != nil || s.Status.Images != nil {
		t.Errorf("managed fields and images must go: %+v", s)
	}
	if s.Name != "node-2" || s.ResourceVersion != "7" || s.Labels["zone"] != "a" ||
		s.Annotations["flannel.alpha.coreos.com/public-ip"] != "192.0.2.2" ||
		len(s.Spec.PodCIDRs) != 2 || s.Spec.PodCIDR == "" || len(s.Status.Addresses) != 1 || len(s.Status.Conditions) != 1 {
		t.Errorf("slimNode lost what the overlay reads: %+v", s)
	}
	if o, _ := slimNode("not a node"); o != "not a node" {
		t.Errorf("other objects must pass unchanged, got %v", o)
	}
}
