// Package forward is the one place where the node decides whether to
// forward pod traffic. Canal's blanket FORWARD accepts for the cluster CIDR
// let traffic skip Calico's policy (canal#115, flannel#938); here a packet
// to or from a pod veth first passes the policy loop's chains, and only the
// pod traffic they let through is accepted.
//
//	FORWARD -> SLUICE-FORWARD
//	  -i sl+ -> SLUICE-FROM-POD   egress policy: RETURN to allow, DROP to deny
//	  -o sl+ -> SLUICE-TO-POD     ingress policy: RETURN to allow, DROP to deny
//	  -i sl+ -> ACCEPT
//	  -o sl+ -> ACCEPT
//
// The policy loop owns the contents of SLUICE-FROM-POD and SLUICE-TO-POD;
// this package only makes sure they exist and never flushes them.
package forward
