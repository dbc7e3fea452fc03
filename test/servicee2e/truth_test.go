package servicee2e

import (
	"testing"
)

// serviceTruthTable: NetworkPolicy applies to Service traffic exactly as to
// pod-IP traffic. Ingress is judged on the real source pod (kube-proxy
// does not masquerade pod-to-ClusterIP traffic); egress on the backend pod
// and its port, after DNAT.
func (c *cluster) serviceTruthTable(t *testing.T) {
	defer c.deletePolicies(t, ns, "deny-web", "web-from-clients", "web-from-nodes", "client-egress-web")
	web, db := c.svc("web"), c.svc("db")
	viaNode1 := c.nodePort("node-1", nodePortCl)

	// No policy: everything answers, and web sees the client pod itself.
	if seen := c.expect(t, "svc/client", web, true); seen != c.podIPs["client"] {
		t.Errorf("through ClusterIP, web saw %s, want the client pod %s", seen, c.podIPs["client"])
	}
	c.expect(t, "svc/other", web, true)
	c.expect(t, "svc/web-1", web, true) // the hairpin
	c.expect(t, "svc/client", viaNode1, true)
	// kube-proxy's REJECT of a Service without endpoints runs for pod
	// traffic: Sluice's accept comes after kube-proxy's FORWARD rules.
	c.refused(t, "svc/client", c.svc("empty"))

	// Default deny ingress for web: nothing reaches it through any
	// Service, except web itself through its own (a pod reaching itself is
	// never subject to policy). db, next to it, still answers: the control.
	c.applyPolicy(t, denyIngress("web"))
	c.expect(t, "svc/client", web, false)
	c.expect(t, "svc/other", web, false)
	c.expect(t, "svc/client", viaNode1, false)
	c.expect(t, "external", viaNode1, false)
	c.expect(t, "svc/web-1", web, true)
	c.expect(t, "svc/client", db, true)

	// Allow from role=client: the client through ClusterIP, not other.
	// Through a NodePort the policy sees the client's node, which
	// masqueraded the packet to the node address on its way out.
	c.applyPolicy(t, ingressFrom("web-from-clients", "web", podPeer("role", "client")))
	c.expect(t, "svc/client", web, true)
	c.expect(t, "svc/other", web, false)
	c.expect(t, "svc/client", viaNode1, false)
	node2, _ := c.Node("node-2")
	c.applyPolicy(t, ingressFrom("web-from-nodes", "web", blockPeer(node2.IP4+"/32")...))
	c.expect(t, "svc/client", viaNode1, true)
	c.deletePolicies(t, ns, "deny-web", "web-from-clients", "web-from-nodes")

	// Egress of the client allows app=web on 8080 only: the ClusterIP's
	// port 80 passes because egress is judged after DNAT, on the backend
	// pod and its port; db's Service does not.
	c.applyPolicy(t, clientEgressToWeb())
	c.expect(t, "svc/client", web, true)
	c.expect(t, "svc/client", db, false)
	c.expect(t, "svc/other", db, true)
}

// externalTrafficPolicy: which source address ingress policy sees for a
// NodePort reached from outside the cluster (the README documents it).
//
//	Local,   on the backend's node:  the client's address (and so does the pod)
//	Local,   on another node:        dropped by kube-proxy (no local endpoint)
//	Cluster, on the backend's node:  the client's address (policy runs in
//	                                 FORWARD, before the masquerade in
//	                                 POSTROUTING; the pod sees the node's address)
//	Cluster, on another node:        that node's tunnel address (it masqueraded
//	                                 the packet into the overlay)
func (c *cluster) externalTrafficPolicy(t *testing.T) {
	defer c.deletePolicies(t, ns, "web-from-outside")
	external := c.ExternalIP4
	node1, _ := c.Node("node-1")
	local1, local2 := c.nodePort("node-1", nodePortLocal), c.nodePort("node-2", nodePortLocal)
	cluster1, cluster2 := c.nodePort("node-1", nodePortCl), c.nodePort("node-2", nodePortCl)
	tunnel2 := c.nodeTunnelIP(t, "node-2")

	// Without policy: what the pod sees.
	if seen := c.expect(t, "external", local1, true); seen != external {
		t.Errorf("Local on the backend's node: pod saw %s, want the client %s", seen, external)
	}
	if seen := c.expect(t, "external", cluster1, true); seen != node1.IP4 {
		t.Errorf("Cluster on the backend's node: pod saw %s, want node-1 %s", seen, node1.IP4)
	}
	if seen := c.expect(t, "external", cluster2, true); seen != tunnel2 {
		t.Errorf("Cluster on another node: pod saw %s, want node-2's tunnel address %s", seen, tunnel2)
	}
	c.expect(t, "external", local2, false)

	// Only the outside host may reach web.
	c.applyPolicy(t, ingressFrom("web-from-outside", "web", blockPeer(external+"/32")...))
	c.expect(t, "external", local1, true)
	c.expect(t, "external", cluster1, true)
	c.expect(t, "external", cluster2, false)
	c.expect(t, "svc/client", c.svc("web"), false)
	// Allowing node-2's tunnel address lets the Cluster path through node-2
	// in: proof that this is the address the policy saw.
	c.applyPolicy(t, ingressFrom("web-from-outside", "web", blockPeer(external+"/32", tunnel2+"/32")...))
	c.expect(t, "external", cluster2, true)
	c.expect(t, "external", local2, false)
}
