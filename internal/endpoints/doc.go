// Package endpoints is sluiced's side of the CNI hand-off: the registry of
// the pods wired on this node, served to the CNI plugin over a unix socket.
// A registration returns once the endpoint is programmed, so the plugin's
// ADD, and with it the pod's start, waits for it.
package endpoints
