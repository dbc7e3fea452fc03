package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/cni/endpointapi"
	"github.com/sluice-net/sluice/internal/cleanup"
)

// cleanupNode is `sluiced --cleanup`: it removes what Sluice put on this
// node and, given credentials and a node name, on this node's API objects.
// Everything is attempted even when a step fails; the error lists what is
// left to fix.
func cleanupNode(ctx context.Context, o options) error {
	// A running agent would put everything back within seconds.
	socket := filepath.Join(o.runDir, cleanup.AgentSocket)
	pingCtx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	if endpointapi.NewClient(socket).Ping(pingCtx) == nil {
		return fmt.Errorf("sluiced is still running on this node (it answers on %s): delete the DaemonSet first (kubectl delete -f manifests/sluice.yaml)", socket)
	}
	var removed []string
	var errs []error
	collect := func(r []string, err error) {
		removed = append(removed, r...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	collect(cleanup.Kernel())
	collect(cleanup.Files(o.runDir, o.stateDir))
	switch rc, err := restConfig(o.kubeconfig); {
	case o.nodeName == "":
		klog.InfoS("no node name (--node-name or NODE_NAME): the Node's annotations and subnet claims are left")
	case err != nil:
		klog.InfoS("no API access: the Node's annotations and subnet claims are left", "node", o.nodeName, "err", err)
	default:
		rc.UserAgent = "sluiced-cleanup/" + o.nodeName
		client, err := kubernetes.NewForConfig(rc)
		if err != nil {
			errs = append(errs, err)
			break
		}
		apiCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		collect(cleanup.API(apiCtx, client, o.nodeName))
	}
	for _, r := range removed {
		klog.InfoS("removed", "what", r)
	}
	klog.InfoS("cleanup finished", "removed", len(removed), "errors", len(errs))
	return errors.Join(errs...)
}
