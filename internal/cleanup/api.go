package cleanup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sort"
	"strings"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"

	"github.com/sluice-net/sluice/overlay/lease"
)

// AnnotationPrefixes are the Node annotations Sluice writes: flannel's
// format, which Sluice speaks, and its own.
var AnnotationPrefixes = []string{"flannel.alpha.coreos.com/", "sluice.dev/"}

// API removes this node's annotations and the subnet claims it holds. The
// node's spec.podCIDRs stay: the API server does not let them be unset,
// and the next network plugin reads them.
func API(ctx context.Context, client kubernetes.Interface, nodeName string) ([]string, error) {
	var removed []string
	var errs []error
	node, err := client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
	case err != nil:
		errs = append(errs, fmt.Errorf("reading node %s: %w", nodeName, err))
	default:
		gone := map[string]any{}
		var keys []string
		for k := range node.Annotations {
			for _, p := range AnnotationPrefixes {
				if strings.HasPrefix(k, p) {
					gone[k] = nil // null deletes the key in a merge patch
					keys = append(keys, k)
				}
			}
		}
		if len(gone) > 0 {
			patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": gone}})
			if _, err := client.CoreV1().Nodes().Patch(ctx, nodeName, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
				errs = append(errs, fmt.Errorf("removing annotations of node %s: %w", nodeName, err))
			} else {
				sort.Strings(keys)
				for _, k := range keys {
					removed = append(removed, "node annotation "+k)
				}
			}
		}
	}
	claims, err := client.CoordinationV1().Leases(lease.Namespace).List(ctx, metav1.ListOptions{LabelSelector: lease.ClaimLabel + "=true"})
	if err != nil {
		errs = append(errs, fmt.Errorf("listing subnet claims: %w", err))
		return removed, errors.Join(errs...)
	}
	for _, l := range claims.Items {
		if !heldBy(l.Spec.HolderIdentity, l.OwnerReferences, nodeName) {
			continue
		}
		err := client.CoordinationV1().Leases(lease.Namespace).Delete(ctx, l.Name, metav1.DeleteOptions{})
		if err != nil && !apierrors.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("deleting subnet claim %s: %w", l.Name, err))
			continue
		}
		removed = append(removed, "lease "+lease.Namespace+"/"+l.Name)
	}
	return removed, errors.Join(errs...)
}

func heldBy(holder *string, owners []metav1.OwnerReference, node string) bool {
	if holder != nil && *holder == node {
		return true
	}
	for _, o := range owners {
		if o.Kind == "Node" && o.Name == node {
			return true
		}
	}
	return false
}
