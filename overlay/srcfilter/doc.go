// Package srcfilter accepts VXLAN (or WireGuard) only from known nodes.
//
// The kernel's VXLAN socket decapsulates any UDP datagram to its port whose
// VNI matches, from any source: a host on the underlay that knows the VNI,
// the port and a node's VTEP MAC (all public, in the Node annotations) can
// put packets into the pod network with any inner source address, past
// every policy that trusts pod IPs. So, before decapsulation, in INPUT:
//
//	INPUT -> SLUICE-INPUT
//	  -p udp --dport PORT -m set --match-set SLUICE-NODES4 src -> RETURN
//	  -p udp --dport PORT -> DROP
//
// The set holds the underlay addresses of every Node (this one included),
// and is kept in line with the Node objects by the overlay loop. A DROP,
// not a REJECT: an ICMP error would tell the sender what it hit.
//
// The wireguard backend uses the same filter on its ports: WireGuard drops
// what a known key did not encrypt, but moves a peer's endpoint to
// wherever its packets come from, and the filter keeps endpoints on node
// addresses.
package srcfilter
