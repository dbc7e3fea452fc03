// Package endpoints is sluiced's side of the CNI hand-off: the registry of
// the pods wired on this node, served to the CNI plugin over a unix socket.
// A registration returns once the endpoint is programmed, so the plugin's
// ADD, and with it the pod's start, waits for it.
package endpoints

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
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
)

// PodIPsAnnotation carries a pod's IPs as soon as it is wired, before the
// kubelet reports them in its status, so other nodes can use them at once.
const PodIPsAnnotation = "sluice.dev/pod-ips"

// Programmer programs an endpoint's dataplane (the policy loop). Register
// returns only after it succeeds.
type Programmer interface {
	ProgramEndpoint(ctx context.Context, ep endpointapi.Endpoint) error
	RemoveEndpoint(ctx context.Context, ep endpointapi.Endpoint) error
}

// Registry holds this node's endpoints, persisted in a directory so an agent
// restart forgets none.
type Registry struct {
	dir        string
	client     kubernetes.Interface
	programmer Programmer

	mu  sync.Mutex
	eps map[string]endpointapi.Endpoint
}

// NewRegistry loads the endpoints persisted in dir, dropping those whose
// host veth is gone (their pods were deleted while the agent was down).
func NewRegistry(dir string, client kubernetes.Interface, programmer Programmer) (*Registry, error) {
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
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/ping", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusNoContent) })
	mux.HandleFunc("GET /v1/endpoints", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(r.List())
	})
	mux.HandleFunc("POST /v1/endpoints", func(w http.ResponseWriter, req *http.Request) {
		var ep endpointapi.Endpoint
		if err := json.NewDecoder(http.MaxBytesReader(w, req.Body, 64<<10)).Decode(&ep); err != nil {
			http.Error(w, "bad endpoint: "+err.Error(), http.StatusBadRequest)
			return
		}
		if err := r.Register(req.Context(), ep); err != nil {
			code := http.StatusBadRequest
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				code = http.StatusGatewayTimeout
			}
			http.Error(w, err.Error(), code)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("DELETE /v1/endpoints/{id}/{ifname}", func(w http.ResponseWriter, req *http.Request) {
		if err := r.Unregister(req.Context(), req.PathValue("id"), req.PathValue("ifname")); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { <-ctx.Done(); srv.Close() }()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}
