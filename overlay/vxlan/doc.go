// Package vxlan programs the overlay into the kernel: one VXLAN device per
// family and, for every remote node, the entries that reach its pods.
//
// As in flannel since v0.9, there is no learning and no L2/L3 miss handling
// in user space: every remote node gets exactly one permanent neighbour (ARP
// or NDP) entry for its VTEP address, one permanent FDB entry that sends the
// VTEP's MAC to the node's underlay address, and one onlink route for its
// pod subnet via the VTEP address. These are the entries flannel writes, so
// a flannel node and a Sluice node read each other's Node annotations and
// reach each other's pods.
//
// Sync is level-triggered: it reads what the kernel has, writes only the
// differences, and removes entries of nodes that are gone. Routes Sluice
// writes carry RouteProtocol, so they are found again after a restart
// without touching anyone else's routes.
package vxlan
