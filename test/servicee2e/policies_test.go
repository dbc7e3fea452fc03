package servicee2e

import (
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func labelSel(k, v string) *metav1.LabelSelector {
	return &metav1.LabelSelector{MatchLabels: map[string]string{k: v}}
}

// denyIngress isolates the pods with app=name for ingress.
func denyIngress(name string) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "deny-" + name},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: *labelSel("app", name), PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeIngress}}}
}

// ingressFrom lets the given peers reach app=name.
func ingressFrom(policyName, name string, peers ...networkingv1.NetworkPolicyPeer) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: policyName},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: *labelSel("app", name),
			Ingress: []networkingv1.NetworkPolicyIngressRule{{From: peers}}}}
}

func podPeer(k, v string) networkingv1.NetworkPolicyPeer {
	return networkingv1.NetworkPolicyPeer{PodSelector: labelSel(k, v)}
}

func blockPeer(cidrs ...string) []networkingv1.NetworkPolicyPeer {
	var out []networkingv1.NetworkPolicyPeer
	for _, c := range cidrs {
		out = append(out, networkingv1.NetworkPolicyPeer{IPBlock: &networkingv1.IPBlock{CIDR: c}})
	}
	return out
}

// clientEgressToWeb lets role=client send only to app=web on TCP 8080,
// the backend's port: a Service's port (80) means nothing to egress
// policy, which sees the packet after kube-proxy's DNAT.
func clientEgressToWeb() *networkingv1.NetworkPolicy {
	tcp := corev1.ProtocolTCP
	port := intstr.FromInt32(8080)
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "client-egress-web"},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: *labelSel("role", "client"),
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{
				To:    []networkingv1.NetworkPolicyPeer{podPeer("app", "web")},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &tcp, Port: &port}},
			}}}}
}

// The DNS recipe of the README: default-deny egress for a namespace, and
// DNS to CoreDNS allowed.
func defaultDenyEgress(namespace string) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: "default-deny-egress"},
		Spec: networkingv1.NetworkPolicySpec{PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress}}}
}

func allowDNS(namespace string) *networkingv1.NetworkPolicy {
	udp, tcp := corev1.ProtocolUDP, corev1.ProtocolTCP
	port := intstr.FromInt32(53)
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: namespace, Name: "allow-dns"},
		Spec: networkingv1.NetworkPolicySpec{
			PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			Egress: []networkingv1.NetworkPolicyEgressRule{{
				To: []networkingv1.NetworkPolicyPeer{{
					NamespaceSelector: labelSel("kubernetes.io/metadata.name", "kube-system"),
					PodSelector:       labelSel("k8s-app", "kube-dns"),
				}},
				Ports: []networkingv1.NetworkPolicyPort{{Protocol: &udp, Port: &port}, {Protocol: &tcp, Port: &port}},
			}}}}
}
