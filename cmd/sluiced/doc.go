// Command sluiced is Sluice's node agent, run by the DaemonSet on every
// node. It owns the wiring and nothing else: it reads the flags and
// net-conf.json, picks the iptables backend, and runs in one process
//
//   - the overlay loop (package overlay),
//   - the policy loop (package policy), which is the endpoint programmer,
//   - the endpoint registry the CNI plugin hands pods to (package
//     endpoints), on the socket in --run-dir,
//   - /healthz, /readyz (both loops programmed), /metrics and /status on
//     --health-addr.
//
// With --cleanup it instead removes everything Sluice put on the node
// (package cleanup) and exits.
package main
