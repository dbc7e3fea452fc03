package cnpe2e

import (
	"context"
	"fmt"
	"path/filepath"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// runBranchAgents makes the DaemonSet's agents run the sluiced this test
// binary built from the working tree (labtest.Binaries) instead of the
// one in the node image: real nodes run ghcr.io/sluice-net/sluice from the
// shared image cache, which test/tools/images.sh builds from whatever
// checkout ran it last. The binary is static, and /tmp is shared by the
// lab's nodes, so a hostPath volume brings it into the image.
func runBranchAgents(l *labtest.Lab) error {
	bins, err := labtest.Binaries()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ds, err := l.Client.AppsV1().DaemonSets(lab.AgentNamespace).Get(ctx, lab.AgentDaemonSet, metav1.GetOptions{})
	if err != nil {
		return err
	}
	spec := &ds.Spec.Template.Spec
	spec.Volumes = append(spec.Volumes, corev1.Volume{Name: "branch-bin",
		VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{Path: bins}}})
	for i := range spec.Containers {
		c := &spec.Containers[i]
		if c.Name != "sluiced" {
			continue
		}
		c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: "branch-bin", MountPath: "/opt/sluice-branch", ReadOnly: true})
		c.Command[0] = filepath.Join("/opt/sluice-branch", "sluiced")
	}
	if _, err := l.Client.AppsV1().DaemonSets(lab.AgentNamespace).Update(ctx, ds, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("pointing the agents at the branch's sluiced: %w", err)
	}
	// Let the DaemonSet controller see the new generation first.
	time.Sleep(2 * time.Second)
	return l.WaitAgentsReady(ctx)
}
