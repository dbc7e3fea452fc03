package overlay

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/overlay/lease"
)

// ReasonReady is the NetworkUnavailable=False reason Sluice sets, as
// flannel sets FlannelIsUp and Calico CalicoIsUp.
const ReasonReady = "SluiceIsUp"

func nodeRef(name string) *corev1.ObjectReference {
	// Events on a Node are conventionally recorded with the node name as UID.
	return &corev1.ObjectReference{Kind: "Node", Name: name, UID: types.UID(name)}
}

// reportLeaseProblem tells the operator on the Node itself why it has no
// pod network: a NetworkUnavailable=True condition and a warning Event.
func (l *Loop) reportLeaseProblem(ctx context.Context, e *lease.Error) {
	if l.recorder != nil {
		l.recorder.Event(nodeRef(l.cfg.NodeName), corev1.EventTypeWarning, e.Reason, e.Message)
	}
	if err := l.patchCondition(ctx, corev1.ConditionTrue, e.Reason, e.Message); err != nil {
		klog.FromContext(ctx).Error(err, "setting NetworkUnavailable=True")
	}
}

func (l *Loop) setNetworkAvailable(ctx context.Context) error {
	return l.patchCondition(ctx, corev1.ConditionFalse, ReasonReady, "Sluice's overlay is programmed on this node")
}

// patchCondition sets NetworkUnavailable. Conditions merge by type, so the
// patch leaves the kubelet's conditions alone.
func (l *Loop) patchCondition(ctx context.Context, status corev1.ConditionStatus, reason, msg string) error {
	now := metav1.NewTime(time.Now())
	cond := corev1.NodeCondition{Type: corev1.NodeNetworkUnavailable, Status: status, Reason: reason, Message: msg, LastTransitionTime: now, LastHeartbeatTime: now}
	patch, err := json.Marshal(map[string]any{"status": map[string]any{"conditions": []corev1.NodeCondition{cond}}})
	if err != nil {
		return err
	}
	_, err = l.client.CoreV1().Nodes().PatchStatus(ctx, l.cfg.NodeName, patch)
	if err != nil {
		return fmt.Errorf("patching node condition: %w", err)
	}
	return nil
}

// publishAnnotations writes this node's flannel-format annotations when they
// differ from what the Node has. A public-ip-overwrite set by the operator
// is honoured as the advertised address.
func (l *Loop) publishAnnotations(ctx context.Context, self *corev1.Node) error {
	var ip4, ip6 = l.publicIP(false), l.publicIP(true)
	if !l.cfg.Net.EnableIPv4 {
		ip4 = netip.Addr{}
	}
	if !l.cfg.Net.EnableIPv6 {
		ip6 = netip.Addr{}
	}
	if ov := self.Annotations[AnnPublicIPOverwrite]; ov != "" && ip4.IsValid() {
		if a, err := netip.ParseAddr(ov); err == nil && a.Is4() {
			ip4 = a
		}
	}
	if ov := self.Annotations[AnnPublicIPv6Overwrite]; ov != "" && ip6.IsValid() {
		if a, err := netip.ParseAddr(ov); err == nil && a.Is6() {
			ip6 = a
		}
	}
	want := ownAnnotations(l.cfg.Net.Backend.Type, ip4, ip6, l.backend.data(false), l.backend.data(true))
	changed := map[string]any{}
	for k, v := range want {
		if self.Annotations[k] != v {
			changed[k] = v
		}
	}
	if len(changed) == 0 {
		return nil
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": changed}})
	if err != nil {
		return err
	}
	if _, err := l.client.CoreV1().Nodes().Patch(ctx, l.cfg.NodeName, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		return fmt.Errorf("annotating node: %w", err)
	}
	klog.FromContext(ctx).Info("node annotations published", "annotations", changed)
	return nil
}
