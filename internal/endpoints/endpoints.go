package endpoints

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"

	"github.com/sluice-net/sluice/cni/endpointapi"
	"github.com/sluice-net/sluice/internal/atomicfile"
	"github.com/sluice-net/sluice/internal/contract"
	"github.com/sluice-net/sluice/internal/metrics"
)

// PodIPsAnnotation is the annotation the registry writes.
const PodIPsAnnotation = endpointapi.PodIPsAnnotation

// Registry holds this node's endpoints, persisted in a directory so an agent
// restart forgets none.
type Registry struct {
	dir        string
	client     kubernetes.Interface
	programmer contract.EndpointProgrammer // Register returns only after it succeeds

	mu  sync.Mutex
	eps map[string]endpointapi.Endpoint
}

// NewRegistry loads the endpoints persisted in dir, dropping those whose
// host veth is gone (their pods were deleted while the agent was down).
func NewRegistry(dir string, client kubernetes.Interface, programmer contract.EndpointProgrammer) (*Registry, error) {
	r := &Registry{dir: dir, client: client, programmer: programmer, eps: map[string]endpointapi.Endpoint{}}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating endpoint dir: %w", err)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	for _, e := range entries {
		path := filepath.Join(dir, e.Name())
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		var ep endpointapi.Endpoint
		if err := json.Unmarshal(b, &ep); err != nil || ep.ContainerID == "" {
			klog.InfoS("dropping unreadable endpoint record", "file", path)
			os.Remove(path)
			continue
		}
		if _, err := netlink.LinkByName(ep.HostVeth); err != nil {
			klog.InfoS("forgetting endpoint whose veth is gone", "pod", ep.Namespace+"/"+ep.Pod, "veth", ep.HostVeth)
			os.Remove(path)
			continue
		}
		r.eps[ep.Key()] = ep
	}
	return r, nil
}

func (r *Registry) path(key string) string {
	return filepath.Join(r.dir, strings.ReplaceAll(key, "/", "_")+".json")
}

// List returns the endpoints sorted by pod.
func (r *Registry) List() []endpointapi.Endpoint {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]endpointapi.Endpoint, 0, len(r.eps))
	for _, ep := range r.eps {
		out = append(out, ep)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Namespace+"/"+out[i].Pod < out[j].Namespace+"/"+out[j].Pod })
	return out
}

// Register records and programs an endpoint.
func (r *Registry) Register(ctx context.Context, ep endpointapi.Endpoint) error {
	if ep.ContainerID == "" || ep.IfName == "" || ep.HostVeth == "" || len(ep.IPs) == 0 {
		return fmt.Errorf("endpoint needs containerID, ifName, hostVeth and ips")
	}
	for _, ip := range ep.IPs {
		if net.ParseIP(ip) == nil {
			return fmt.Errorf("endpoint IP %q is not an IP address", ip)
		}
	}
	if r.programmer != nil {
		if err := r.programmer.ProgramEndpoint(ctx, ep); err != nil {
			return fmt.Errorf("programming endpoint: %w", err)
		}
	}
	b, err := json.Marshal(ep)
	if err != nil {
		return err
	}
	if err := atomicfile.Write(r.path(ep.Key()), b, 0o600); err != nil {
		return err
	}
	r.mu.Lock()
	r.eps[ep.Key()] = ep
	r.mu.Unlock()
	if ep.Namespace != "" && ep.Pod != "" && r.client != nil {
		go r.annotate(ep)
	}
	klog.InfoS("endpoint registered", "pod", ep.Namespace+"/"+ep.Pod, "veth", ep.HostVeth, "ips", ep.IPs)
	return nil
}

// annotate writes the pod's IPs onto the Pod, retrying briefly: the Pod may
// not be visible to this client yet.
func (r *Registry) annotate(ep endpointapi.Endpoint) {
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{PodIPsAnnotation: strings.Join(ep.IPs, ",")}}})
	backoff := wait.Backoff{Duration: 100 * time.Millisecond, Factor: 2, Steps: 6}
	err := wait.ExponentialBackoff(backoff, func() (bool, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := r.client.CoreV1().Pods(ep.Namespace).Patch(ctx, ep.Pod, types.MergePatchType, patch, metav1.PatchOptions{})
		return err == nil, nil
	})
	if err != nil {
		klog.InfoS("could not annotate pod with its IPs", "pod", ep.Namespace+"/"+ep.Pod, "err", err)
	}
}

// Unregister removes an endpoint; an unknown one is not an error.
func (r *Registry) Unregister(ctx context.Context, containerID, ifName string) error {
	key := containerID + "/" + ifName
	r.mu.Lock()
	ep, ok := r.eps[key]
	delete(r.eps, key)
	r.mu.Unlock()
	if ok && r.programmer != nil {
		if err := r.programmer.RemoveEndpoint(ctx, ep); err != nil {
			return err
		}
	}
	if err := os.Remove(r.path(key)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if ok {
		klog.InfoS("endpoint removed", "pod", ep.Namespace+"/"+ep.Pod, "veth", ep.HostVeth)
	}
	return nil
}

// ForgetVanished unregisters the endpoints whose host veth is gone: their
// pods went without a DEL reaching this agent (the agent was busy or
// restarting, or the runtime removed the sandbox's namespace). Left in
// place, such an endpoint would keep claiming its IPs for its old pod's
// identity after IPAM gave them to a new pod. The plugin creates the veth
// before it registers, so a registered endpoint without one is dead.
func (r *Registry) ForgetVanished(ctx context.Context) (int, error) {
	var errs []error
	n := 0
	for _, ep := range r.List() {
		if _, err := netlink.LinkByName(ep.HostVeth); err == nil || !errors.As(err, &netlink.LinkNotFoundError{}) {
			continue
		}
		r.mu.Lock()
		cur, ok := r.eps[ep.Key()]
		r.mu.Unlock()
		// An ADD retried for the same container may have registered
		// again meanwhile, with a new veth.
		if !ok || cur.HostVeth != ep.HostVeth || !slices.Equal(cur.IPs, ep.IPs) {
			continue
		}
		if _, err := netlink.LinkByName(ep.HostVeth); err == nil {
			continue
		}
		klog.InfoS("forgetting endpoint whose veth is gone", "pod", ep.Namespace+"/"+ep.Pod, "veth", ep.HostVeth, "ips", ep.IPs)
		if err := r.Unregister(ctx, ep.ContainerID, ep.IfName); err != nil {
			errs = append(errs, fmt.Errorf("forgetting endpoint of %s/%s: %w", ep.Namespace, ep.Pod, err))
			continue
		}
		n++
	}
	return n, errors.Join(errs...)
}

// RunGC calls ForgetVanished every period until ctx ends.
func (r *Registry) RunGC(ctx context.Context, period time.Duration) {
	wait.UntilWithContext(ctx, func(ctx context.Context) {
		if _, err := r.ForgetVanished(ctx); err != nil {
			klog.ErrorS(err, "forgetting endpoints whose veth is gone")
		}
	}, period)
}

// countOutcome adds a CNI call's outcome to the agent's metrics.
func countOutcome(o endpointapi.Outcome) error {
	if !slices.Contains(endpointapi.Verbs, o.Verb) {
		return fmt.Errorf("unknown CNI verb %q", o.Verb)
	}
	if o.Code == 0 {
		metrics.CNIRequests.WithLabelValues(o.Verb, "ok").Inc()
		return nil
	}
	metrics.CNIRequests.WithLabelValues(o.Verb, "error").Inc()
	metrics.CNIErrors.WithLabelValues(o.Verb, strconv.FormatUint(uint64(o.Code), 10)).Inc()
	return nil
}

// Serve answers the CNI plugin on a unix socket until ctx ends. The socket
// is only reachable by root on the node.
func (r *Registry) Serve(ctx context.Context, socket string) error {
	if err := os.MkdirAll(filepath.Dir(socket), 0o755); err != nil {
		return err
	}
	_ = os.Remove(socket) // a stale socket of a previous agent
	ln, err := net.Listen("unix", socket)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", socket, err)
	}
	if err := os.Chmod(socket, 0o600); err != nil {
		ln.Close()
		return err
	}
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accepting on %s: %w", socket, err)
		}
		go r.serveConn(ctx, conn)
	}
}

func (r *Registry) serveConn(ctx context.Context, conn net.Conn) {
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	var req endpointapi.Request
	if err := json.NewDecoder(io.LimitReader(conn, 64<<10)).Decode(&req); err != nil {
		_ = json.NewEncoder(conn).Encode(endpointapi.Response{Error: "bad request: " + err.Error()})
		return
	}
	timeout := req.Timeout
	if timeout <= 0 || timeout > time.Minute {
		timeout = endpointapi.Timeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	resp := endpointapi.Response{OK: true}
	var err error
	switch req.Op {
	case endpointapi.OpPing:
	case endpointapi.OpList:
		resp.Endpoints = r.List()
	case endpointapi.OpRegister:
		if req.Endpoint == nil {
			err = errors.New("register needs an endpoint")
			break
		}
		if err = r.Register(ctx, *req.Endpoint); err == nil && req.Outcome != nil {
			err = countOutcome(*req.Outcome)
		}
	case endpointapi.OpReport:
		if req.Outcome == nil {
			err = errors.New("report needs an outcome")
			break
		}
		err = countOutcome(*req.Outcome)
	case endpointapi.OpUnregister:
		if req.Endpoint == nil {
			err = errors.New("unregister needs an endpoint")
			break
		}
		err = r.Unregister(ctx, req.Endpoint.ContainerID, req.Endpoint.IfName)
	default:
		err = fmt.Errorf("unknown op %q", req.Op)
	}
	if err != nil {
		resp = endpointapi.Response{Error: err.Error(), Retry: errors.Is(err, context.DeadlineExceeded)}
	}
	_ = conn.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_ = json.NewEncoder(conn).Encode(resp)
}
