// Command sluicectl shows Sluice's status (what a node's sluiced serves on
// /status) and runs a local lab cluster in network namespaces (package
// lab).
package main
