// Package overlay is sluiced's overlay loop: flannel-compatible VXLAN,
// host-gw or WireGuard (encrypted) with per-node routes, built from Node
// objects, plus masquerade and MTU handling. Each backend plugs in through
// the backend interface (backend.go), which owns its overhead, its
// annotation data, its tunnel port and the programming of its peers. It finds the node's pod
// subnet (its lease, package lease), publishes it with the node's tunnel
// endpoint as flannel-format annotations, writes subnet.env, and keeps the
// kernel's VXLAN device (package vxlan), routes, neighbour and FDB
// entries, masquerade rules (package masq) and VXLAN source filter
// (package srcfilter) in line with the cluster's Nodes. The forwarding
// decision for pod traffic is the policy loop's, not this package's.
//
// The loop is level-triggered: any Node event, and a timer, queue one full
// sync that reads all Nodes from the informer cache and the kernel's current
// state, and writes only the differences. A failed sync is retried with
// backoff; nothing is dropped.
package overlay
