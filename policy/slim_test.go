package policy

import (
	"reflect"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/cni/endpointapi"
)

// TestSlimPodKeepsTheModel: the informer transform drops most of a pod,
// and the model made from what is left is the model of the whole pod.
func TestSlimPodKeepsTheModel(t *testing.T) {
	full := func() *corev1.Pod {
		return &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "p", UID: "u1", ResourceVersion: "7", Labels: map[string]string{"app": "web"},
				Annotations:   map[string]string{endpointapi.PodIPsAnnotation: "10.0.0.9", "big": "x"},
				ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubectl"}}},
			Spec: corev1.PodSpec{NodeName: "n1", ServiceAccountName: "sa", Containers: []corev1.Container{
				{Name: "c", Image: "img", Env: []corev1.EnvVar{{Name: "X"}}, Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 80}, {ContainerPort: 81}}},
				{Name: "d", Ports: []corev1.ContainerPort{{Name: "dns", ContainerPort: 53, Protocol: corev1.ProtocolUDP}}},
				{Name: "e"},
			}},
			Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: "10.0.0.9", PodIPs: []corev1.PodIP{{IP: "10.0.0.9"}, {IP: "fd00::9"}},
				Conditions: []corev1.PodCondition{{Type: corev1.PodReady}}},
		}
	}
	l := &Loop{}
	for name, mutate := range map[string]func(*corev1.Pod){
		"running":         func(*corev1.Pod) {},
		"annotation only": func(p *corev1.Pod) { p.Status.PodIPs, p.Status.PodIP = nil, "" },
		"host network":    func(p *corev1.Pod) { p.Spec.HostNetwork = true },
		"finished":        func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded },
	} {
		p := full()
		mutate(p)
		got, err := slimObject(p.DeepCopy())
		if err != nil {
			t.Fatal(err)
		}
		slim := got.(*corev1.Pod)
		if want, have := l.modelPod(p), l.modelPod(slim); !reflect.DeepEqual(want, have) {
			t.Errorf("%s: model of the slim pod\n%+v\nwant\n%+v", name, have, want)
		}
		if objectVersion(slim) != objectVersion(p) || slim.Spec.NodeName != "n1" {
			t.Errorf("%s: identity lost: %+v", name, slim.ObjectMeta)
		}
		if len(slim.ManagedFields) != 0 || slim.Annotations["big"] != "" || len(slim.Spec.Containers) != 2 || len(slim.Status.Conditions) != 0 {
			t.Errorf("%s: kept what policy does not read: %+v", name, slim)
		}
	}
	// Policies keep their spec and lose the managed fields.
	np := &metav1.PartialObjectMetadata{ObjectMeta: metav1.ObjectMeta{Name: "x", ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "m"}}}}
	out, _ := slimObject(np)
	if out != np || np.ManagedFields != nil {
		t.Errorf("a policy's managed fields: %+v", out)
	}
}
