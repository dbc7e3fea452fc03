// Package cni is the logic of the sluice CNI plugin: it wires a pod's veth,
// IP and routes, and registers the endpoint with the policy loop.
package cni
