// Package policy is sluiced's policy loop: Kubernetes and Calico network
// policies translated into per-veth iptables chains with ipsets, applied
// atomically.
package policy
