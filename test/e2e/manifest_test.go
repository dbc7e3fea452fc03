package e2e

import (
	"path/filepath"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/sluice-net/sluice/overlay/netconf"
	"github.com/sluice-net/sluice/test/labtest"
)

var manifest = filepath.Join(labtest.RepoRoot(), "manifests", "sluice.yaml")

// TestManifestApplies validates the manifest with the API server itself
// (server-side dry run), then applies it for real and reads it back.
func TestManifestApplies(t *testing.T) {
	ctx := ctxT(t)
	if out, err := shared.Kubectl(ctx, "", "apply", "--dry-run=server", "-f", manifest); err != nil {
		t.Fatalf("server-side dry run: %v\n%s", err, out)
	}
	out, err := shared.Kubectl(ctx, "", "apply", "-f", manifest)
	if err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	t.Cleanup(func() { _, _ = shared.Kubectl(ctxT(t), "", "delete", "--wait=false", "-f", manifest) })
	for _, want := range []string{"serviceaccount/sluice", "clusterrole.rbac.authorization.k8s.io/sluice", "clusterrolebinding.rbac.authorization.k8s.io/sluice", "configmap/sluice", "daemonset.apps/sluice"} {
		if !strings.Contains(out, want) {
			t.Errorf("apply did not create %s:\n%s", want, out)
		}
	}
	ds, err := shared.Client.AppsV1().DaemonSets("kube-system").Get(ctx, "sluice", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork || spec.PriorityClassName != "system-node-critical" || len(spec.Tolerations) != 1 || string(spec.Tolerations[0].Operator) != "Exists" {
		t.Errorf("pod spec: hostNetwork=%v priority=%q tolerations=%v", spec.HostNetwork, spec.PriorityClassName, spec.Tolerations)
	}
	if len(spec.InitContainers) != 1 || spec.InitContainers[0].Command[1] != "install" {
		t.Errorf("init container: %+v", spec.InitContainers)
	}
	c := spec.Containers[0]
	if c.LivenessProbe == nil || c.ReadinessProbe == nil || c.Env[0].Name != "NODE_NAME" || c.Env[0].ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("agent container: %+v", c)
	}
	hasLock := false
	for _, v := range spec.Volumes {
		if v.HostPath != nil && v.HostPath.Path == "/run/xtables.lock" {
			hasLock = true
		}
	}
	if !hasLock {
		t.Error("no /run/xtables.lock host path")
	}
	if string(ds.Spec.UpdateStrategy.Type) != "RollingUpdate" {
		t.Errorf("update strategy %s", ds.Spec.UpdateStrategy.Type)
	}
	// The shipped net-conf.json is valid.
	cm, err := shared.Client.CoreV1().ConfigMaps("kube-system").Get(ctx, "sluice", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := netconf.Parse([]byte(cm.Data["net-conf.json"])); err != nil {
		t.Errorf("the manifest's net-conf.json: %v", err)
	}
	var conflist map[string]any
	if err := yaml.Unmarshal([]byte(cm.Data["cni-conflist.json"]), &conflist); err != nil || conflist["name"] != "sluice" {
		t.Errorf("the manifest's conflist: %v %v", conflist, err)
	}
	// The ServiceAccount may do what the agent needs, and no more.
	for _, c := range []struct {
		verb, resource string
		want           bool
	}{
		{"patch", "nodes", true}, {"watch", "networkpolicies.networking.k8s.io", true}, {"create", "leases.coordination.k8s.io", true},
		{"patch", "pods", true}, {"list", "secrets", false}, {"delete", "nodes", false}, {"create", "pods", false},
	} {
		out, _ := shared.Kubectl(ctx, "", "auth", "can-i", c.verb, c.resource, "--as=system:serviceaccount:kube-system:sluice", "-A")
		if got := strings.TrimSpace(out) == "yes"; got != c.want {
			t.Errorf("sluice can %s %s: %q, want %v", c.verb, c.resource, strings.TrimSpace(out), c.want)
		}
	}
}

var cleanupManifest = filepath.Join(labtest.RepoRoot(), "manifests", "sluice-cleanup.yaml")

// TestCleanupManifestApplies validates the uninstall DaemonSet with the API
// server, checks that its paths match the install's, and that its own
// ServiceAccount may do what the cleanup needs and no more.
func TestCleanupManifestApplies(t *testing.T) {
	ctx := ctxT(t)
	out, err := shared.Kubectl(ctx, "", "apply", "-f", cleanupManifest)
	if err != nil {
		t.Fatalf("apply: %v\n%s", err, out)
	}
	t.Cleanup(func() { _, _ = shared.Kubectl(ctxT(t), "", "delete", "--wait=false", "-f", cleanupManifest) })
	ds, err := shared.Client.AppsV1().DaemonSets("kube-system").Get(ctx, "sluice-cleanup", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork || len(spec.Tolerations) != 1 || string(spec.Tolerations[0].Operator) != "Exists" || len(spec.InitContainers) != 2 {
		t.Fatalf("pod spec: %+v", spec)
	}
	uninstall, clean := spec.InitContainers[0], spec.InitContainers[1]
	// The uninstall reads the record the install wrote, with the paths the
	// install saw: same flags, same mount points.
	for _, want := range []string{"uninstall", "--cni-conf-dir=/host/etc/cni/net.d", "--cni-state-dir=/host/var/lib/cni"} {
		if !strings.Contains(strings.Join(uninstall.Command, " "), want) {
			t.Errorf("uninstall command %v lacks %s", uninstall.Command, want)
		}
	}
	mounts := map[string]bool{}
	for _, m := range uninstall.VolumeMounts {
		mounts[m.MountPath] = true
	}
	if !mounts["/host/opt/cni/bin"] || !mounts["/host/etc/cni/net.d"] {
		t.Errorf("uninstall mounts %v; want the install's /host/opt/cni/bin and /host/etc/cni/net.d", uninstall.VolumeMounts)
	}
	if c := strings.Join(clean.Command, " "); !strings.Contains(c, "--cleanup") || clean.Env[0].ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("cleanup container: %v %+v", clean.Command, clean.Env)
	}
	for _, c := range []struct {
		verb, resource, ns string
		want               bool
	}{
		{"patch", "nodes", "", true}, {"delete", "leases.coordination.k8s.io", "kube-system", true},
		{"delete", "leases.coordination.k8s.io", "default", false}, {"delete", "nodes", "", false}, {"list", "secrets", "kube-system", false},
	} {
		args := []string{"auth", "can-i", c.verb, c.resource, "--as=system:serviceaccount:kube-system:sluice-cleanup"}
		if c.ns != "" {
			args = append(args, "-n", c.ns)
		}
		out, _ := shared.Kubectl(ctx, "", args...)
		// The answer is the last line; a warning about scope may precede it.
		lines := strings.Split(strings.TrimSpace(out), "\n")
		if got := strings.TrimSpace(lines[len(lines)-1]) == "yes"; got != c.want {
			t.Errorf("sluice-cleanup can %s %s in %q: %q, want %v", c.verb, c.resource, c.ns, strings.TrimSpace(out), c.want)
		}
	}
}
