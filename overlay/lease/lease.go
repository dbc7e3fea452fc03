package lease

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"math/big"
	"net/netip"
	"strings"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/klog/v2"
	"k8s.io/utils/ptr"

	"github.com/sluice-net/sluice/overlay/netconf"
)

const (
	// Namespace holds the subnet claims.
	Namespace = "kube-system"
	// ClaimLabel marks a Lease as a subnet claim.
	ClaimLabel = "sluice.dev/subnet-claim"
	// SubnetAnnotation on a claim holds the subnet it claims.
	SubnetAnnotation = "sluice.dev/subnet"
	namePrefix       = "sluice-subnet-"
)

// Source says where a node's subnets came from.
type Source string

const (
	FromNodeSpec   Source = "node.spec.podCIDRs"
	SelfAllocated  Source = "sluice"
	maxCreateTries        = 64
)

// Lease is a node's pod subnets, one per enabled family (IPv4 first).
type Lease struct {
	Subnets []netip.Prefix
	Source  Source
}

// Reasons a lease cannot be had. They are used as Node condition reasons.
const (
	ReasonOutsideNetwork = "PodCIDROutsideNetwork"
	ReasonMissingFamily  = "PodCIDRMissingFamily"
	ReasonExhausted      = "NetworkExhausted"
)

// Error is a lease failure a person has to fix. Its message says how.
type Error struct {
	Reason  string
	Message string
}

func (e *Error) Error() string { return e.Message }

// Allocator finds or claims node subnets.
type Allocator struct {
	Client kubernetes.Interface
	Config *netconf.Config
	// PodCIDRGrace is how long after a Node's creation to wait for
	// kube-controller-manager to give it a podCIDR before claiming one.
	// An agent that starts with its node would otherwise race the
	// controller-manager in a cluster that does allocate pod CIDRs.
	PodCIDRGrace time.Duration
}

// Acquire returns the node's lease. It is idempotent: called again, for the
// same node, it returns the same subnets.
func (a *Allocator) Acquire(ctx context.Context, nodeName string) (*Lease, error) {
	node, err := a.waitForPodCIDR(ctx, nodeName)
	if err != nil {
		return nil, err
	}
	if len(node.Spec.PodCIDRs) > 0 || node.Spec.PodCIDR != "" {
		subnets, err := a.fromSpec(node)
		if err != nil {
			return nil, err
		}
		return &Lease{Subnets: subnets, Source: FromNodeSpec}, nil
	}
	var subnets []netip.Prefix
	for _, network := range a.Config.Networks() {
		s, err := a.claim(ctx, node, network, a.Config.SubnetLenFor(network.Addr().Is6()))
		if err != nil {
			return nil, err
		}
		subnets = append(subnets, s)
	}
	if err := a.recordOnNode(ctx, node, subnets); err != nil {
		return nil, err
	}
	klog.FromContext(ctx).Info("claimed pod subnets for a node without podCIDR", "node", nodeName, "subnets", subnets)
	return &Lease{Subnets: subnets, Source: SelfAllocated}, nil
}

// waitForPodCIDR returns the Node once it has a podCIDR, or once it is
// older than the grace period without one.
func (a *Allocator) waitForPodCIDR(ctx context.Context, nodeName string) (*corev1.Node, error) {
	logged := false
	for {
		node, err := a.Client.CoreV1().Nodes().Get(ctx, nodeName, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("reading node %s: %w", nodeName, err)
		}
		if len(node.Spec.PodCIDRs) > 0 || node.Spec.PodCIDR != "" {
			return node, nil
		}
		left := a.PodCIDRGrace - time.Since(node.CreationTimestamp.Time)
		if left <= 0 {
			return node, nil
		}
		if !logged {
			klog.FromContext(ctx).Info("node has no podCIDR yet; waiting for kube-controller-manager before claiming one", "node", nodeName, "upTo", left.Round(time.Second))
			logged = true
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(min(left, 250*time.Millisecond)):
		}
	}
}

// fromSpec checks the node's podCIDRs against the configured networks.
func (a *Allocator) fromSpec(node *corev1.Node) ([]netip.Prefix, error) {
	cidrs := node.Spec.PodCIDRs
	if len(cidrs) == 0 {
		cidrs = []string{node.Spec.PodCIDR}
	}
	var subnets []netip.Prefix
	for _, network := range a.Config.Networks() {
		var found *netip.Prefix
		for _, c := range cidrs {
			p, err := netip.ParsePrefix(c)
			if err != nil || p.Addr().Is4() != network.Addr().Is4() {
				continue
			}
			if !network.Contains(p.Addr()) || p.Bits() < network.Bits() {
				return nil, &Error{Reason: ReasonOutsideNetwork, Message: fmt.Sprintf(
					"node %s has podCIDR %s, which is outside Sluice's Network %s: make them agree, either by setting "+
						`"Network" in net-conf.json (ConfigMap kube-system/sluice) to the cluster's pod network, `+
						"or by creating the cluster with a matching pod network (kubeadm init --pod-network-cidr=%s, "+
						"or networking.podSubnet in the kubeadm config; kube-controller-manager --cluster-cidr)",
					node.Name, p, network, network)}
			}
			found = &p
			break
		}
		if found == nil {
			fam := "IPv4"
			if network.Addr().Is6() {
				fam = "IPv6"
			}
			return nil, &Error{Reason: ReasonMissingFamily, Message: fmt.Sprintf(
				"node %s has podCIDRs %v but no %s one, and Sluice's net-conf.json enables %s (%s): either disable that family "+
					`in net-conf.json ("EnableIPv4"/"EnableIPv6") or give the cluster a dual-stack pod network `+
					"(kube-controller-manager --cluster-cidr with both families)", node.Name, cidrs, fam, fam, network)}
		}
		subnets = append(subnets, *found)
	}
	return subnets, nil
}

// claim returns the subnet of network this node already holds, or claims a
// free one. The search starts at a point derived from the node's name, so
// agents that start together mostly try different subnets first.
func (a *Allocator) claim(ctx context.Context, node *corev1.Node, network netip.Prefix, subnetLen int) (netip.Prefix, error) {
	leases := a.Client.CoordinationV1().Leases(Namespace)
	for try := 0; try < maxCreateTries; try++ {
		list, err := leases.List(ctx, metav1.ListOptions{LabelSelector: ClaimLabel + "=true"})
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("listing subnet claims: %w", err)
		}
		taken := map[netip.Prefix]bool{}
		for _, l := range list.Items {
			p, err := netip.ParsePrefix(l.Annotations[SubnetAnnotation])
			if err != nil {
				continue
			}
			if ptr.Deref(l.Spec.HolderIdentity, "") == node.Name && network.Contains(p.Addr()) && p.Bits() == subnetLen {
				// Ours from before a restart; make sure the current Node
				// object owns it, in case the Node was recreated.
				if err := a.adopt(ctx, &l, node); err != nil {
					return netip.Prefix{}, err
				}
				return p, nil
			}
			taken[p] = true
		}
		nodes, err := a.Client.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("listing nodes: %w", err)
		}
		for _, n := range nodes.Items {
			for _, c := range append([]string{n.Spec.PodCIDR}, n.Spec.PodCIDRs...) {
				if p, err := netip.ParsePrefix(c); err == nil {
					taken[p] = true
				}
			}
		}
		candidate, ok := freeSubnet(network, subnetLen, taken, startIndex(node.Name))
		if !ok {
			return netip.Prefix{}, &Error{Reason: ReasonExhausted, Message: fmt.Sprintf(
				"no free /%d subnet left in Network %s for node %s (%d claimed): make Network larger or SubnetLen longer "+
					"in net-conf.json (ConfigMap kube-system/sluice), or delete Nodes that no longer exist",
				subnetLen, network, node.Name, len(taken))}
		}
		_, err = leases.Create(ctx, claimObject(node, candidate), metav1.CreateOptions{})
		if err == nil {
			return candidate, nil
		}
		if !apierrors.IsAlreadyExists(err) {
			return netip.Prefix{}, fmt.Errorf("claiming subnet %s: %w", candidate, err)
		}
		// Another agent won this subnet between our list and create; look
		// again.
	}
	return netip.Prefix{}, fmt.Errorf("claiming a subnet of %s: still contended after %d tries", network, maxCreateTries)
}

func (a *Allocator) adopt(ctx context.Context, l *coordinationv1.Lease, node *corev1.Node) error {
	for _, o := range l.OwnerReferences {
		if o.UID == node.UID {
			return nil
		}
	}
	l = l.DeepCopy()
	l.OwnerReferences = []metav1.OwnerReference{nodeOwner(node)}
	_, err := a.Client.CoordinationV1().Leases(Namespace).Update(ctx, l, metav1.UpdateOptions{})
	if err != nil {
		return fmt.Errorf("adopting subnet claim %s: %w", l.Name, err)
	}
	return nil
}

func nodeOwner(node *corev1.Node) metav1.OwnerReference {
	return metav1.OwnerReference{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}
}

// ClaimName is the name of the Lease that claims a subnet.
func ClaimName(p netip.Prefix) string {
	s := strings.NewReplacer(".", "-", ":", "-").Replace(p.Addr().String())
	return fmt.Sprintf("%s%s-%d", namePrefix, strings.Trim(s, "-"), p.Bits())
}

func claimObject(node *corev1.Node, p netip.Prefix) *coordinationv1.Lease {
	return &coordinationv1.Lease{
		ObjectMeta: metav1.ObjectMeta{
			Name:            ClaimName(p),
			Namespace:       Namespace,
			Labels:          map[string]string{ClaimLabel: "true"},
			Annotations:     map[string]string{SubnetAnnotation: p.String()},
			OwnerReferences: []metav1.OwnerReference{nodeOwner(node)},
		},
		Spec: coordinationv1.LeaseSpec{HolderIdentity: ptr.To(node.Name)},
	}
}

// recordOnNode writes the claimed subnets into spec.podCIDRs. The API server
// lets them be set once, from empty; a conflicting value means someone else
// (kube-controller-manager) set them meanwhile, which is reported.
func (a *Allocator) recordOnNode(ctx context.Context, node *corev1.Node, subnets []netip.Prefix) error {
	var cidrs []string
	for _, s := range subnets {
		cidrs = append(cidrs, fmt.Sprintf("%q", s.String()))
	}
	patch := fmt.Sprintf(`{"spec":{"podCIDR":%s,"podCIDRs":[%s]}}`, cidrs[0], strings.Join(cidrs, ","))
	_, err := a.Client.CoreV1().Nodes().Patch(ctx, node.Name, types.StrategicMergePatchType, []byte(patch), metav1.PatchOptions{})
	if err != nil {
		return fmt.Errorf("recording subnets %v on node %s: %w", subnets, node.Name, err)
	}
	return nil
}

// startIndex spreads the first choice of concurrent agents.
func startIndex(node string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(node))
	return h.Sum64()
}

// freeSubnet returns the first subnet of network with length bits, from the
// one at start (modulo the count), that is not taken.
func freeSubnet(network netip.Prefix, bits int, taken map[netip.Prefix]bool, start uint64) (netip.Prefix, bool) {
	width := bits - network.Bits()
	if width <= 0 {
		return netip.Prefix{}, false
	}
	count := new(big.Int).Lsh(big.NewInt(1), uint(width))
	// Searching beyond a million subnets is pointless for a cluster.
	limit := uint64(1 << 20)
	if count.IsUint64() && count.Uint64() < limit {
		limit = count.Uint64()
	}
	base := new(big.Int).SetBytes(network.Addr().AsSlice())
	step := new(big.Int).Lsh(big.NewInt(1), uint(network.Addr().BitLen()-bits))
	for i := uint64(0); i < limit; i++ {
		idx := (start + i) % limit
		addr := new(big.Int).Add(base, new(big.Int).Mul(step, new(big.Int).SetUint64(idx)))
		p := netip.PrefixFrom(addrFromInt(addr, network.Addr().Is4()), bits)
		if !overlapsTaken(p, taken) {
			return p, true
		}
	}
	return netip.Prefix{}, false
}

func overlapsTaken(p netip.Prefix, taken map[netip.Prefix]bool) bool {
	if taken[p] {
		return true
	}
	for t := range taken {
		if t.Overlaps(p) {
			return true
		}
	}
	return false
}

func addrFromInt(i *big.Int, v4 bool) netip.Addr {
	n := 16
	if v4 {
		n = 4
	}
	b := i.FillBytes(make([]byte, n))
	a, _ := netip.AddrFromSlice(b)
	return a
}

// IsUserError tells a lease failure a person must fix from a transient one.
func IsUserError(err error) (*Error, bool) {
	var e *Error
	ok := errors.As(err, &e)
	return e, ok
}
