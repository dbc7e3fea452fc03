package kubelet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	cnitypes100 "github.com/containernetworking/cni/pkg/types/100"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/cache"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"

	"github.com/sluice-net/sluice/internal/lab"
)

// sandbox is a pod's network namespace and what runs in it. Its record is
// persisted so that a restarted kubelet can CNI DEL it.
type sandbox struct {
	ID          string          `json:"id"`
	Namespace   string          `json:"namespace"`
	Name        string          `json:"name"`
	UID         types.UID       `json:"uid"`
	NetNS       string          `json:"netns"`
	HostNetwork bool            `json:"hostNetwork"`
	IPs         []string        `json:"ips"`
	Conflist    json.RawMessage `json:"conflist,omitempty"`
	// CapabilityArgs are needed again at DEL, so portmap can remove its
	// rules.
	CapabilityArgs map[string]any `json:"capabilityArgs,omitempty"`

	responders []*lab.Responder
	// runner runs the containers of a pod of Sluice's image; such pods get
	// no responders.
	runner *podRunner
}

func (sb *sandbox) key() string { return sb.Namespace + "/" + sb.Name }

// syncPod makes the node match the pod: a sandbox for every running pod,
// none for a deleted or finished one. It is level-triggered: it reads the
// current pod from the lister, whatever event queued it.
func (k *Kubelet) syncPod(ctx context.Context, key string) error {
	namespace, name, err := cache.SplitMetaNamespaceKey(key)
	if err != nil {
		return nil
	}
	pod, err := k.pods.Pods(namespace).Get(name)
	if apierrors.IsNotFound(err) {
		pod = nil
	} else if err != nil {
		return err
	}
	k.mu.Lock()
	sb := k.sandboxes[key]
	k.mu.Unlock()

	stale := sb != nil && (pod == nil || pod.UID != sb.UID || pod.DeletionTimestamp != nil || podFinished(pod))
	if stale {
		if sb.runner != nil && pod != nil && pod.UID == sb.UID && pod.DeletionGracePeriodSeconds != nil {
			sb.runner.grace = time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
		}
		if err := k.teardown(ctx, sb); err != nil {
			return err
		}
		sb = nil
	}
	if pod == nil {
		return nil
	}
	if pod.DeletionTimestamp != nil {
		// Everything of the pod on this node is gone; finish the deletion as
		// the kubelet does, guarded by UID against a pod recreated meanwhile.
		err := k.client.CoreV1().Pods(namespace).Delete(ctx, name, metav1.DeleteOptions{
			GracePeriodSeconds: ptr.To[int64](0),
			Preconditions:      &metav1.Preconditions{UID: &pod.UID},
		})
		if err != nil && !apierrors.IsNotFound(err) && !apierrors.IsConflict(err) {
			return fmt.Errorf("finishing deletion: %w", err)
		}
		return nil
	}
	if podFinished(pod) {
		return nil
	}
	if sb == nil {
		if sb, err = k.setup(ctx, pod); err != nil {
			k.recorder.Eventf(pod, corev1.EventTypeWarning, "FailedCreatePodSandBox", "failed to set up pod network: %v", err)
			return err
		}
	}
	return k.reportRunning(ctx, pod, sb)
}

func podFinished(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

// setup creates the sandbox: namespace, CNI ADD, and the "containers".
// A failure at any step undoes the steps before it.
func (k *Kubelet) setup(ctx context.Context, pod *corev1.Pod) (_ *sandbox, err error) {
	sb := &sandbox{ID: newID(), Namespace: pod.Namespace, Name: pod.Name, UID: pod.UID, HostNetwork: pod.Spec.HostNetwork}
	defer func() {
		if err != nil {
			if terr := k.teardown(ctx, sb); terr != nil {
				klog.FromContext(ctx).Error(terr, "undoing failed sandbox", "pod", sb.key())
			}
		}
	}()
	if sb.HostNetwork {
		sb.IPs = []string{k.node.IP4}
		if k.node.IP6 != "" && k.lab.IPv6 {
			sb.IPs = append(sb.IPs, k.node.IP6)
		}
	} else {
		list, raw, err := loadConflist()
		if err != nil {
			return nil, err
		}
		sb.Conflist = raw
		sb.CapabilityArgs = capabilityArgs(pod)
		sb.NetNS = "/run/netns/pod-" + sb.ID[:12]
		// Persist before creating anything, so a crash leaves a record.
		if err := k.saveRecord(sb); err != nil {
			return nil, err
		}
		if err := createNetNS(filepath.Base(sb.NetNS)); err != nil {
			return nil, err
		}
		cni := libcni.NewCNIConfigWithCacheDir([]string{cniBinDir}, cniCacheDir, nil)
		if _, err := cni.AddNetworkList(ctx, loopbackConflist(), k.runtimeConf(sb, "lo", nil)); err != nil {
			return nil, fmt.Errorf("CNI ADD loopback: %w", err)
		}
		res, err := cni.AddNetworkList(ctx, list, k.runtimeConf(sb, "eth0", sb.CapabilityArgs))
		if err != nil {
			return nil, fmt.Errorf("CNI ADD %s: %w", list.Name, err)
		}
		result, err := cnitypes100.NewResultFromResult(res)
		if err != nil {
			return nil, fmt.Errorf("reading CNI result: %w", err)
		}
		for _, ip := range result.IPs {
			sb.IPs = append(sb.IPs, ip.Address.IP.String())
		}
		if len(sb.IPs) == 0 {
			return nil, fmt.Errorf("CNI ADD %s returned no IP", list.Name)
		}
	}
	if k.runsAsProcesses(pod) {
		if sb.runner, err = k.newRunner(ctx, pod, sb); err != nil {
			return nil, err
		}
	}
	for _, port := range containerPorts(pod) {
		if sb.runner != nil {
			break // the containers serve their own ports
		}
		reply := pod.Namespace + "/" + pod.Name
		r, err := lab.ListenResponder(sb.NetNS, port, func(net.Addr) string { return reply })
		if err != nil {
			return nil, fmt.Errorf("starting container port %d: %w", port, err)
		}
		sb.responders = append(sb.responders, r)
	}
	if err := k.saveRecord(sb); err != nil {
		return nil, err
	}
	if err := k.publish(sb); err != nil {
		return nil, err
	}
	k.mu.Lock()
	k.sandboxes[sb.key()] = sb
	k.mu.Unlock()
	if sb.runner != nil {
		sb.runner.start(ctx)
	}
	klog.FromContext(ctx).Info("pod sandbox ready", "pod", sb.key(), "ips", sb.IPs)
	return sb, nil
}

// teardown is idempotent: every step tolerates what is already gone, so it
// also releases a half-made sandbox or one left by a previous kubelet.
func (k *Kubelet) teardown(ctx context.Context, sb *sandbox) error {
	if sb.runner != nil {
		sb.runner.stop(sb.runner.grace)
	}
	if err := os.RemoveAll(k.podDir(sb.UID)); err != nil {
		return fmt.Errorf("removing the files of pod %s: %w", sb.key(), err)
	}
	for _, r := range sb.responders {
		r.Close()
	}
	sb.responders = nil
	if !sb.HostNetwork && sb.Conflist != nil {
		list, err := libcni.ConfListFromBytes(sb.Conflist)
		if err != nil {
			return fmt.Errorf("parsing the conflist of sandbox %s: %w", sb.ID, err)
		}
		netns := sb.NetNS
		if _, err := os.Stat(netns); err != nil {
			// CNI DEL must still release the IP when the namespace is gone.
			netns = ""
		}
		rt := k.runtimeConf(sb, "eth0", sb.CapabilityArgs)
		rt.NetNS = netns
		cni := libcni.NewCNIConfigWithCacheDir([]string{cniBinDir}, cniCacheDir, nil)
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			return fmt.Errorf("CNI DEL %s for pod %s: %w", list.Name, sb.key(), err)
		}
		lo := k.runtimeConf(sb, "lo", nil)
		lo.NetNS = netns
		if err := cni.DelNetworkList(ctx, loopbackConflist(), lo); err != nil {
			klog.FromContext(ctx).Error(err, "CNI DEL loopback", "pod", sb.key())
		}
	}
	if sb.NetNS != "" {
		if err := deleteNetNS(filepath.Base(sb.NetNS)); err != nil {
			return err
		}
	}
	k.mu.Lock()
	if k.sandboxes[sb.key()] == sb {
		delete(k.sandboxes, sb.key())
	}
	k.mu.Unlock()
	if err := os.Remove(k.node.PodRecordPath(sb.Namespace, sb.Name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Remove(filepath.Join(stateDir, sb.ID+".json")); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	klog.FromContext(ctx).Info("pod sandbox removed", "pod", sb.key(), "id", sb.ID)
	return nil
}

// releaseStaleSandboxes tears down the sandboxes of a previous kubelet. Its
// namespaces died with its mount namespace, but IPs and rules remain until
// CNI DEL releases them.
func (k *Kubelet) releaseStaleSandboxes(ctx context.Context) {
	entries, err := os.ReadDir(stateDir)
	if err != nil {
		return
	}
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(stateDir, e.Name()))
		if err != nil {
			continue
		}
		var sb sandbox
		if err := json.Unmarshal(b, &sb); err != nil {
			klog.FromContext(ctx).Error(err, "unreadable sandbox record; removing", "file", e.Name())
			os.Remove(filepath.Join(stateDir, e.Name()))
			continue
		}
		if err := k.teardown(ctx, &sb); err != nil {
			klog.FromContext(ctx).Error(err, "releasing stale sandbox", "pod", sb.key())
		}
	}
}

func (k *Kubelet) saveRecord(sb *sandbox) error {
	b, err := json.Marshal(sb)
	if err != nil {
		return err
	}
	return lab.WriteFileAtomic(filepath.Join(stateDir, sb.ID+".json"), b, 0o600)
}

// publish writes the pod record that `lab exec` and `lab probe` read.
func (k *Kubelet) publish(sb *sandbox) error {
	rec := lab.PodRecord{Namespace: sb.Namespace, Name: sb.Name, UID: string(sb.UID), Node: k.node.Name, NetNS: sb.NetNS, IPs: sb.IPs, HostNetwork: sb.HostNetwork}
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return lab.WriteFileAtomic(k.node.PodRecordPath(sb.Namespace, sb.Name), b, 0o644)
}

// reportRunning writes the pod's IPs, phase, conditions and container
// statuses, unless they are already there.
func (k *Kubelet) reportRunning(ctx context.Context, pod *corev1.Pod, sb *sandbox) error {
	now := metav1.Now()
	p := pod.DeepCopy()
	p.Status.Phase = corev1.PodRunning
	p.Status.HostIP = k.node.IP4
	p.Status.HostIPs = []corev1.HostIP{{IP: k.node.IP4}}
	p.Status.PodIP = sb.IPs[0]
	p.Status.PodIPs = nil
	for _, ip := range sb.IPs {
		p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
	}
	if p.Status.StartTime == nil {
		p.Status.StartTime = &now
	}
	initialized, ready := true, true
	if sb.runner != nil {
		initialized, p.Status.InitContainerStatuses, p.Status.ContainerStatuses = sb.runner.snapshot()
		for _, c := range p.Status.ContainerStatuses {
			ready = ready && c.Ready
		}
		if !initialized {
			p.Status.Phase = corev1.PodPending
		}
	} else {
		p.Status.ContainerStatuses = nil
		for _, c := range pod.Spec.Containers {
			p.Status.ContainerStatuses = append(p.Status.ContainerStatuses, corev1.ContainerStatus{
				Name:        c.Name,
				Image:       c.Image,
				ImageID:     "lab://" + c.Image,
				ContainerID: "lab://" + sb.ID,
				Ready:       true,
				Started:     ptr.To(true),
				State:       corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}},
			})
		}
	}
	status := func(b bool) corev1.ConditionStatus {
		if b {
			return corev1.ConditionTrue
		}
		return corev1.ConditionFalse
	}
	p.Status.Conditions = nil
	for _, c := range []struct {
		t  corev1.PodConditionType
		ok bool
	}{{corev1.PodScheduled, true}, {corev1.PodReadyToStartContainers, true}, {corev1.PodInitialized, initialized}, {corev1.ContainersReady, ready}, {corev1.PodReady, ready}} {
		cond := corev1.PodCondition{Type: c.t, Status: status(c.ok), LastTransitionTime: now}
		// Keep the transition time of a condition that did not change.
		for _, old := range pod.Status.Conditions {
			if old.Type == c.t && old.Status == cond.Status {
				cond.LastTransitionTime = old.LastTransitionTime
			}
		}
		p.Status.Conditions = append(p.Status.Conditions, cond)
	}
	if sameStatus(pod.Status, p.Status) {
		return nil
	}
	if _, err := k.client.CoreV1().Pods(p.Namespace).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		return fmt.Errorf("reporting pod status: %w", err)
	}
	return nil
}

// sameStatus compares what the kubelet reports, ignoring timestamps, so
// that a sync that changes nothing writes nothing.
func sameStatus(a, b corev1.PodStatus) bool {
	if a.Phase != b.Phase || a.PodIP != b.PodIP || len(a.PodIPs) != len(b.PodIPs) || len(a.Conditions) != len(b.Conditions) {
		return false
	}
	for i := range a.Conditions {
		if a.Conditions[i].Type != b.Conditions[i].Type || a.Conditions[i].Status != b.Conditions[i].Status {
			return false
		}
	}
	return sameContainers(a.InitContainerStatuses, b.InitContainerStatuses) && sameContainers(a.ContainerStatuses, b.ContainerStatuses)
}

func sameContainers(a, b []corev1.ContainerStatus) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		x, y := a[i], b[i]
		if x.Name != y.Name || x.Ready != y.Ready || x.RestartCount != y.RestartCount ||
			(x.State.Running == nil) != (y.State.Running == nil) || (x.State.Terminated == nil) != (y.State.Terminated == nil) ||
			(x.State.Waiting == nil) != (y.State.Waiting == nil) {
			return false
		}
		// A restarted container has a new ID.
		if x.ContainerID != y.ContainerID {
			return false
		}
	}
	return true
}

// runtimeConf carries what containerd passes to CNI for a pod sandbox.
func (k *Kubelet) runtimeConf(sb *sandbox, ifName string, caps map[string]any) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: sb.ID,
		NetNS:       sb.NetNS,
		IfName:      ifName,
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", sb.Namespace},
			{"K8S_POD_NAME", sb.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", sb.ID},
			{"K8S_POD_UID", string(sb.UID)},
		},
		CapabilityArgs: caps,
	}
}

type portMapping struct {
	HostPort      int32  `json:"hostPort"`
	ContainerPort int32  `json:"containerPort"`
	Protocol      string `json:"protocol"`
	HostIP        string `json:"hostIP,omitempty"`
}

type bandwidth struct {
	IngressRate  uint64 `json:"ingressRate,omitempty"`
	IngressBurst uint64 `json:"ingressBurst,omitempty"`
	EgressRate   uint64 `json:"egressRate,omitempty"`
	EgressBurst  uint64 `json:"egressBurst,omitempty"`
}

// capabilityArgs builds portMappings from hostPorts and bandwidth from the
// kubernetes.io/{ingress,egress}-bandwidth annotations, as containerd does.
func capabilityArgs(pod *corev1.Pod) map[string]any {
	caps := map[string]any{}
	var pms []portMapping
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if p.HostPort == 0 {
				continue
			}
			proto := strings.ToLower(string(p.Protocol))
			if proto == "" {
				proto = "tcp"
			}
			pms = append(pms, portMapping{HostPort: p.HostPort, ContainerPort: p.ContainerPort, Protocol: proto, HostIP: p.HostIP})
		}
	}
	if len(pms) > 0 {
		caps["portMappings"] = pms
	}
	var bw bandwidth
	// Burst as kubelet's dockershim set it: effectively unlimited, so the
	// rate alone shapes traffic.
	if q, err := resource.ParseQuantity(pod.Annotations["kubernetes.io/ingress-bandwidth"]); err == nil {
		bw.IngressRate, bw.IngressBurst = uint64(q.Value()), math.MaxInt32
	}
	if q, err := resource.ParseQuantity(pod.Annotations["kubernetes.io/egress-bandwidth"]); err == nil {
		bw.EgressRate, bw.EgressBurst = uint64(q.Value()), math.MaxInt32
	}
	if bw != (bandwidth{}) {
		caps["bandwidth"] = bw
	}
	if len(caps) == 0 {
		return nil
	}
	return caps
}

// containerPorts lists the distinct port numbers the pod's containers
// declare; each is served on both TCP and UDP.
func containerPorts(pod *corev1.Pod) []int {
	seen := map[int]bool{}
	var ports []int
	for _, c := range pod.Spec.Containers {
		for _, p := range c.Ports {
			if !seen[int(p.ContainerPort)] {
				seen[int(p.ContainerPort)] = true
				ports = append(ports, int(p.ContainerPort))
			}
		}
	}
	sort.Ints(ports)
	return ports
}

// loadConflist picks the node's network the way containerd does: the first
// valid file in /etc/cni/net.d in lexical order.
func loadConflist() (*libcni.NetworkConfigList, []byte, error) {
	files, err := libcni.ConfFiles(cniConfDir, []string{".conf", ".conflist", ".json"})
	if err != nil {
		return nil, nil, fmt.Errorf("reading %s: %w", cniConfDir, err)
	}
	sort.Strings(files)
	for _, f := range files {
		var list *libcni.NetworkConfigList
		if strings.HasSuffix(f, ".conflist") {
			list, err = libcni.ConfListFromFile(f)
		} else {
			var conf *libcni.PluginConfig
			if conf, err = libcni.ConfFromFile(f); err == nil {
				list, err = libcni.ConfListFromConf(conf)
			}
		}
		if err != nil || len(list.Plugins) == 0 {
			continue
		}
		return list, list.Bytes, nil
	}
	return nil, nil, fmt.Errorf("network not ready: no CNI configuration in %s", cniConfDir)
}

func loopbackConflist() *libcni.NetworkConfigList {
	list, err := libcni.ConfListFromBytes([]byte(`{"cniVersion":"1.0.0","name":"cni-loopback","plugins":[{"type":"loopback"}]}`))
	if err != nil {
		panic(err)
	}
	return list
}

func newID() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
