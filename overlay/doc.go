// Package overlay is sluiced's overlay loop: flannel-compatible VXLAN with
// per-node routes, ARP and FDB entries built from Node objects, plus
// masquerade and MTU handling.
package overlay
