// Package lease finds the pod subnet(s) of a node: its spec.podCIDRs when
// the cluster allocates them, or a subnet Sluice claims for the node itself
// when it does not (a cluster made without --pod-network-cidr, where flannel
// dies with "pod cidr not assigned").
//
// A self-allocated subnet is claimed by creating a coordination.k8s.io Lease
// named after the subnet in kube-system. Creating an object is atomic in the
// API server, so two agents can never hold the same subnet. The Lease is
// owned by the Node, so the garbage collector returns the subnet when the
// Node is deleted. The subnet is then written into the Node's spec.podCIDRs
// (which may be set once), where every tool that reads pod CIDRs finds it,
// and where the agent finds it again after a restart.
package lease
