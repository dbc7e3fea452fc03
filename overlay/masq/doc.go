// Package masq renders the masquerade rules of the overlay: pod traffic that
// leaves the cluster network takes the node's address, and nothing inside
// the cluster network is rewritten.
package masq
