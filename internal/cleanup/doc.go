// Package cleanup removes everything Sluice put on a node, for
// `sluiced --cleanup`, after the DaemonSet is gone. It follows
// `kube-proxy --cleanup`: find what is ours by name and remove exactly
// that, whatever state the agent left it in (crashed mid-sync, older
// version, other iptables backend), so it is safe to run twice or on a node
// where Sluice never ran.
//
// What is Sluice's:
//   - iptables chains named SLUICE-* in any table, family and backend, and
//     the rules of other chains that jump to them (the hooks in FORWARD and
//     POSTROUTING);
//   - ipsets named SLUICE-*;
//   - the WireGuard devices wg-sluice and wg6-sluice (kernel, or the
//     userspace implementation's persistent TUN devices);
//   - the VXLAN devices vx-sluice.<VNI> and vx6-sluice.<VNI> (with their
//     neighbour and FDB entries), the pod veths sl<11 hex> (with the pods'
//     /32 and /128 routes), and routes with protocol 98 (tunnel, host-gw
//     and blackhole routes);
//   - the agent's files: subnet.env and the socket in the run dir, endpoint
//     records and the WireGuard key in the state dir;
//   - on the API, the node's flannel.alpha.coreos.com/* and sluice.dev/*
//     annotations and the subnet claims (Leases) it holds.
package cleanup
