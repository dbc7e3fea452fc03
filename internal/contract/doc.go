// Package contract holds the few names and interfaces that the parts of
// Sluice agree on: the CNI plugin, the overlay loop, the policy loop, the
// endpoint registry and the rule writer. Each part may depend on this
// package; this package depends on none of them but the endpoint API that
// the plugin and the agent already share. A name defined here is defined
// nowhere else.
package contract
