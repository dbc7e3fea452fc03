// Package kubelet is the lab's stand-in for a kubelet and container runtime.
// It registers its Node and keeps the node Lease fresh, and for each Pod bound
// to the node it makes a network namespace, calls the node's CNI conflist
// through libcni exactly as containerd does, serves every containerPort
// inside the pod's namespace, and reports the pod Running with its IPs.
//
// It runs as its own process inside the node's network namespace and a
// private mount namespace, in which it binds the node's host paths.
package kubelet

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/internal/lab"
)

const (
	cniConfDir  = "/etc/cni/net.d"
	cniBinDir   = "/opt/cni/bin"
	cniCacheDir = "/var/lib/cni"
	// stateDir holds one record per sandbox, so a restarted kubelet can
	// release what its predecessor allocated.
	stateDir = "/var/lib/lab-kubelet/sandboxes"
	workers  = 8
)

// Kubelet runs one lab node.
type Kubelet struct {
	lab      *lab.State
	node     lab.Node
	client   kubernetes.Interface
	pods     corelisters.PodLister
	queue    workqueue.TypedRateLimitingInterface[string]
	recorder record.EventRecorder

	mu        sync.Mutex
	sandboxes map[string]*sandbox // by namespace/name
}

// Run prepares the node's mount namespace and runs the kubelet until ctx
// ends.
func Run(ctx context.Context, dir, nodeName string) error {
	s, err := lab.Load(dir)
	if err != nil {
		return err
	}
	n, ok := s.Node(nodeName)
	if !ok {
		return fmt.Errorf("lab has no node %q", nodeName)
	}
	if err := bindHostPaths(*n); err != nil {
		return err
	}
	if err := lab.WriteFileAtomic(filepath.Join(n.Dir, "kubelet.pid"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return err
	}
	cfg, err := clientcmd.BuildConfigFromFlags("", s.Path("pki", "node-"+n.Name+".kubeconfig"))
	if err != nil {
		return fmt.Errorf("loading node kubeconfig: %w", err)
	}
	cfg.QPS, cfg.Burst = 50, 100
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return err
	}
	k := &Kubelet{
		lab:       s,
		node:      *n,
		client:    client,
		sandboxes: map[string]*sandbox{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](100*time.Millisecond, 10*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "pods"}),
	}
	broadcaster := record.NewBroadcaster(record.WithContext(ctx))
	broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: client.CoreV1().Events("")})
	defer broadcaster.Shutdown()
	k.recorder = broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "lab-kubelet", Host: n.Name})
	return k.run(ctx)
}

// bindHostPaths gives this mount namespace the node's private host paths
// and a sysfs of the node's own network namespace.
func bindHostPaths(n lab.Node) error {
	if err := lab.BindNodeHostPaths(n, []string{"/etc/cni/net.d", "/opt/cni/bin", "/run", "/var/lib"}); err != nil {
		return err
	}
	// A sysfs mounted from inside the node's network namespace shows that
	// namespace's interfaces under /sys/class/net, as on a real node.
	if err := syscall.Mount("sysfs", "/sys", "sysfs", 0, ""); err != nil {
		return fmt.Errorf("mounting sysfs: %w", err)
	}
	return os.MkdirAll(stateDir, 0o755)
}

func (k *Kubelet) run(ctx context.Context) error {
	logger := klog.FromContext(ctx).WithValues("node", k.node.Name)
	ctx = klog.NewContext(ctx, logger)
	if err := k.register(ctx); err != nil {
		return err
	}
	go wait.UntilWithContext(ctx, k.renewLease, 10*time.Second)
	go wait.UntilWithContext(ctx, k.reportStatus, time.Minute)

	k.releaseStaleSandboxes(ctx)

	factory := informers.NewSharedInformerFactoryWithOptions(k.client, 10*time.Minute,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", k.node.Name).String()
		}))
	podInformer := factory.Core().V1().Pods()
	k.pods = podInformer.Lister()
	enqueue := func(obj any) {
		if key, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj); err == nil {
			k.queue.Add(key)
		}
	}
	if _, err := podInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueue,
		UpdateFunc: func(_, obj any) { enqueue(obj) },
		DeleteFunc: enqueue,
	}); err != nil {
		return err
	}
	factory.Start(ctx.Done())
	factory.WaitForCacheSync(ctx.Done())
	logger.Info("lab kubelet running")

	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k.processNext(ctx) {
			}
		}()
	}
	<-ctx.Done()
	k.queue.ShutDown()
	wg.Wait()
	factory.Shutdown()
	return nil
}

func (k *Kubelet) processNext(ctx context.Context) bool {
	key, quit := k.queue.Get()
	if quit {
		return false
	}
	defer k.queue.Done(key)
	if err := k.syncPod(ctx, key); err != nil {
		klog.FromContext(ctx).Error(err, "syncing pod; will retry", "pod", key)
		k.queue.AddRateLimited(key)
		return true
	}
	k.queue.Forget(key)
	return true
}
