package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/httpstream"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/transport/spdy"
)

// apiFlags reach agents from a workstation through the API server: the
// agent's --health-addr listens on the node's loopback, and a port-forward
// into the DaemonSet's pod on that node (hostNetwork, so its loopback is
// the node's) opens it, with nothing but a kubeconfig and the RBAC in the
// README: get and list pods in the agents' namespace, create
// pods/portforward there, and get pods cluster-wide to find a pod's node.
type apiFlags struct {
	kubeconfig string
	namespace  string
	selector   string
	// via forces "api", "lab" or "local"; "" picks (agentAccess.mode).
	via string

	once   sync.Once
	cfg    *rest.Config
	client kubernetes.Interface
	err    error
}

func (f *apiFlags) flags(c *cobra.Command) {
	c.Flags().StringVar(&f.kubeconfig, "kubeconfig", "", "reach agents through this cluster's API server (also $KUBECONFIG with --via api)")
	c.Flags().StringVar(&f.namespace, "agent-namespace", "kube-system", "namespace of the sluice DaemonSet, with the API server")
	c.Flags().StringVar(&f.selector, "agent-selector", "app.kubernetes.io/name=sluice", "labels of the sluice DaemonSet's pods, with the API server")
	c.Flags().StringVar(&f.via, "via", "", "how to reach agents: api (kubeconfig), lab (a lab's node namespaces) or local (--addr); default: api with --kubeconfig, lab when the lab exists, else local")
}

func (f *apiFlags) load() (kubernetes.Interface, *rest.Config, error) {
	f.once.Do(func() {
		rules := clientcmd.NewDefaultClientConfigLoadingRules()
		if f.kubeconfig != "" {
			rules.ExplicitPath = f.kubeconfig
		}
		f.cfg, f.err = clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, nil).ClientConfig()
		if f.err != nil {
			f.err = fmt.Errorf("loading the kubeconfig: %w", f.err)
			return
		}
		f.cfg.UserAgent = "sluicectl"
		f.client, f.err = kubernetes.NewForConfig(f.cfg)
	})
	return f.client, f.cfg, f.err
}

// forbidden turns an API refusal into the message a user can act on:
// which verb on which resource their kubeconfig lacks.
func forbidden(err error, verb, resource, namespace string) error {
	if err == nil {
		return nil
	}
	if apierrors.IsForbidden(err) || strings.Contains(err.Error(), "forbidden") {
		where := "cluster-wide"
		if namespace != "" {
			where = "in namespace " + namespace
		}
		return fmt.Errorf("forbidden: this kubeconfig's user may not %s %s %s, which sluicectl needs to reach the agents "+
			"(bind the ClusterRole and Role in the README's \"Troubleshooting: RBAC\"): %w", verb, resource, where, err)
	}
	return err
}

// nodeOfPod reads a pod's node from the API server.
func (f *apiFlags) nodeOfPod(ctx context.Context, ref string) (string, error) {
	cs, _, err := f.load()
	if err != nil {
		return "", err
	}
	namespace, name, _ := strings.Cut(ref, "/")
	p, err := cs.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return "", forbidden(err, "get", "pods", namespace)
	}
	if p.Spec.NodeName == "" {
		return "", fmt.Errorf("pod %s is not scheduled to a node yet", ref)
	}
	return p.Spec.NodeName, nil
}

// agentPods lists the DaemonSet's pods by node.
func (f *apiFlags) agentPods(ctx context.Context) (map[string]corev1.Pod, error) {
	cs, _, err := f.load()
	if err != nil {
		return nil, err
	}
	list, err := cs.CoreV1().Pods(f.namespace).List(ctx, metav1.ListOptions{LabelSelector: f.selector})
	if err != nil {
		return nil, forbidden(err, "list", "pods", f.namespace)
	}
	out := map[string]corev1.Pod{}
	for _, p := range list.Items {
		if p.Spec.NodeName != "" && p.DeletionTimestamp == nil {
			out[p.Spec.NodeName] = p
		}
	}
	return out, nil
}

// transport returns an HTTP transport whose every connection is a new
// port-forward stream to the agent pod of node.
func (f *apiFlags) transport(ctx context.Context, node string) (http.RoundTripper, error) {
	pods, err := f.agentPods(ctx)
	if err != nil {
		return nil, err
	}
	pod, ok := pods[node]
	if !ok {
		return nil, fmt.Errorf("no sluice agent pod (%s in %s) runs on node %s", f.selector, f.namespace, node)
	}
	cs, cfg, _ := f.load()
	rt, upgrader, err := spdy.RoundTripperFor(cfg)
	if err != nil {
		return nil, err
	}
	u := cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(pod.Namespace).Name(pod.Name).SubResource("portforward").URL()
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, http.MethodPost, u)
	conn, _, err := dialer.Dial(portForwardProtocol)
	if err != nil {
		return nil, forbidden(fmt.Errorf("port-forward to %s/%s: %w", pod.Namespace, pod.Name, err), "create", "pods/portforward", pod.Namespace)
	}
	pf := &forwarded{conn: conn}
	return &http.Transport{DisableKeepAlives: true, DialContext: func(_ context.Context, _, addr string) (net.Conn, error) {
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			return nil, err
		}
		return pf.dial(port)
	}}, nil
}

// portForwardProtocol is the kubelet's port-forward stream protocol
// (client-go's portforward.PortForwardProtocolV1Name).
const portForwardProtocol = "portforward.k8s.io"

// forwarded is one port-forward connection; each dial is a new pair of
// streams on it, as kubectl port-forward makes per local connection.
type forwarded struct {
	conn httpstream.Connection
	mu   sync.Mutex
	next int
}

func (f *forwarded) dial(port string) (net.Conn, error) {
	f.mu.Lock()
	f.next++
	id := f.next
	f.mu.Unlock()
	h := http.Header{}
	h.Set(corev1.StreamType, corev1.StreamTypeError)
	h.Set(corev1.PortHeader, port)
	h.Set(corev1.PortForwardRequestIDHeader, strconv.Itoa(id))
	errStream, err := f.conn.CreateStream(h)
	if err != nil {
		return nil, fmt.Errorf("opening a port-forward stream: %w", err)
	}
	errStream.Close() // nothing to send on it
	h.Set(corev1.StreamType, corev1.StreamTypeData)
	data, err := f.conn.CreateStream(h)
	if err != nil {
		return nil, fmt.Errorf("opening a port-forward stream: %w", err)
	}
	c := &streamConn{Stream: data, remote: make(chan error, 1)}
	go func() {
		msg, err := io.ReadAll(errStream)
		if err == nil && len(msg) > 0 {
			err = errors.New(string(msg))
		}
		c.remote <- err
	}()
	return c, nil
}

// streamConn is a port-forward data stream as a net.Conn.
type streamConn struct {
	httpstream.Stream
	remote chan error
}

func (c *streamConn) Read(p []byte) (int, error) {
	n, err := c.Stream.Read(p)
	if err == io.EOF {
		select {
		case rerr := <-c.remote:
			if rerr != nil {
				return n, fmt.Errorf("the kubelet could not forward: %w", rerr)
			}
		default:
		}
	}
	return n, err
}

func (c *streamConn) Close() error                     { return c.Stream.Reset() }
func (c *streamConn) LocalAddr() net.Addr              { return fakeAddr{} }
func (c *streamConn) RemoteAddr() net.Addr             { return fakeAddr{} }
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

type fakeAddr struct{}

func (fakeAddr) Network() string { return "portforward" }
func (fakeAddr) String() string  { return "portforward" }
