// Command sluice is Sluice's CNI plugin. Called by a container runtime (with
// CNI_COMMAND set) it wires a pod; called by a person or the DaemonSet's
// init container, it installs or uninstalls itself:
//
//	sluice install [flags]
//	sluice uninstall [--cni-bin-dir DIR] [--cni-conf-dir DIR] [--cni-state-dir DIR]
package main
