package policy

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
)

// TestEndpointOfAnUnknownPodIsRefused: an ADD for a pod the agent's cache
// does not hold (created while the agent could not reach the API server)
// is refused with a retryable error before the plugin's deadline, and
// nothing of it reaches the kernel, so it never runs unprotected. The
// control: once the pod is in the API, the same endpoint is programmed.
func TestEndpointOfAnUnknownPodIsRefused(t *testing.T) {
	h := startLoop(t, Config{}, nil, apiObjects()...)
	ep := localEndpoint("x/z", "10.244.1.9")
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel()
	err := h.loop.ProgramEndpoint(ctx, ep)
	if err == nil || !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "not known to this agent") {
		t.Fatalf("ProgramEndpoint of an unknown pod = %v, want a refusal wrapping context.DeadlineExceeded", err)
	}
	if ctx.Err() != nil {
		t.Errorf("the refusal came after the caller's deadline; the plugin would not see it")
	}
	if s := h.loop.Status(); s.Endpoints != 2 {
		t.Errorf("the refused endpoint was added: %d endpoints", s.Endpoints)
	}
	if kernel := h.save(); strings.Contains(kernel, ep.HostVeth) {
		t.Errorf("the refused endpoint reached the kernel:\n%s", kernel)
	}

	// A pod of that name but another UID is another pod.
	ep.PodUID = "uid-of-the-new-one"
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "x", Name: "z", UID: types.UID("uid-of-an-old-one"), Labels: map[string]string{"pod": "z"}},
		Spec: corev1.PodSpec{NodeName: "node-1"}}
	if _, err := h.client.CoreV1().Pods("x").Create(context.Background(), pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ctx2, cancel2 := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	defer cancel2()
	if err := h.loop.ProgramEndpoint(ctx2, ep); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("ProgramEndpoint for a pod whose UID differs = %v, want a refusal", err)
	}

	ep.PodUID = "uid-of-an-old-one"
	ctx3, cancel3 := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel3()
	if err := h.loop.ProgramEndpoint(ctx3, ep); err != nil {
		t.Fatalf("ProgramEndpoint once the pod is known: %v", err)
	}
	if kernel := h.save(); !strings.Contains(kernel, "-g "+EndpointChain(ep.HostVeth, false)) {
		t.Errorf("the known pod's endpoint is not dispatched:\n%s", kernel)
	}
}

func TestResyncReplaysAreNotChanges(t *testing.T) {
	a := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "a", ResourceVersion: "5"}}
	if !isResyncReplay(a, a) {
		t.Error("a resync replay (the same object) counted as a change")
	}
	if isResyncReplay(a, a.DeepCopy()) {
		t.Error("a new copy of an object, even with the same resourceVersion, not counted as a change")
	}
}
