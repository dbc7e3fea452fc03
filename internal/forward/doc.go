// Package forward is the one place where the node decides whether to
// forward pod traffic. Canal's blanket FORWARD accepts for the cluster CIDR
// let traffic skip Calico's policy (canal#115, flannel#938); here a packet
// to or from a pod veth first passes the policy loop's chains, and only the
// pod traffic they let through is accepted, at the end of FORWARD:
//
//	FORWARD
//	  1st  -> SLUICE-FORWARD
//	            -i sl+ -> SLUICE-FROM-POD   egress policy: RETURN to allow, DROP to deny
//	            -o sl+ -> SLUICE-TO-POD     ingress policy: RETURN to allow, DROP to deny
//	  ...     kube-proxy's jumps (KUBE-PROXY-FIREWALL, KUBE-FORWARD,
//	          KUBE-SERVICES, KUBE-EXTERNAL-SERVICES) and anyone else's
//	  last -> SLUICE-FORWARD-ACCEPT
//	            -i sl+ -> ACCEPT
//	            -o sl+ -> ACCEPT
//
// The decision comes first, so nobody's blanket accept can skip it, and
// it only drops or returns. The accept comes after kube-proxy's rules, so
// they still apply to pod traffic: the REJECT of a Service without
// endpoints, loadBalancerSourceRanges, the drop of conntrack-INVALID
// packets. An accept at the top would skip them all. No mark is needed:
// pod traffic that reaches the end of FORWARD has passed the decision.
//
// kube-proxy inserts its jumps at the top once and after that only checks
// that they exist; Sluice moves its decision back above them once, so the
// two never fight over the order.
//
// Pod traffic to the node itself never crosses FORWARD; INPUT's first
// rule jumps to SLUICE-TO-HOST, where only ClusterNetworkPolicy decides
// it (Kubernetes NetworkPolicy always allows a pod's own node). It too
// only drops or returns.
//
// The policy loop owns the contents of SLUICE-FROM-POD, SLUICE-TO-POD and
// SLUICE-TO-HOST; this package only makes sure they exist and never
// flushes them.
package forward
