package policy

import (
	"errors"
	"slices"
	"strings"
)

// MatrixCell is one pair of a who-can-reach-whom table, as the model
// decides it.
type MatrixCell struct {
	From    string `json:"from"`
	To      string `json:"to"`
	Allowed bool   `json:"allowed"`
	// Why is the deciding direction's summary when denied, both
	// directions' when allowed.
	Why string `json:"why"`
}

// Matrix is the expected table for the pods of some namespaces on one
// port, computed from the model without sending a packet.
type Matrix struct {
	Node  string       `json:"node"`
	Pods  []string     `json:"pods"`
	Port  int32        `json:"port"`
	Proto Protocol     `json:"protocol"`
	Cells []MatrixCell `json:"cells"`
}

// Matrix decides every pair of pods (a pod never probes itself) of the
// namespaces on port/proto, over each pod's first address.
func (l *Loop) Matrix(namespaces []string, port int32, proto Protocol) (*Matrix, error) {
	m := l.model.Load()
	if m == nil {
		return nil, errors.New("the policy loop has not synced yet")
	}
	if proto == "" {
		proto = TCP
	}
	var eps []Endpoint
	out := &Matrix{Node: l.cfg.NodeName, Port: port, Proto: proto}
	for _, p := range m.pods {
		if slices.Contains(namespaces, p.Namespace) && len(p.IPs) > 0 {
			eps = append(eps, Endpoint{Pod: p, Namespace: m.namespaces[p.Namespace], IP: p.IPs[0]})
		}
	}
	slices.SortFunc(eps, func(a, b Endpoint) int { return strings.Compare(podKey(a.Pod), podKey(b.Pod)) })
	e := &Evaluator{Policies: mapValues(m.policies), NetworkSets: m.netsets, Namespaces: m.namespaces}
	for _, src := range eps {
		out.Pods = append(out.Pods, podKey(src.Pod))
		for _, dst := range eps {
			if src.Pod == dst.Pod || src.IP.Is6() != dst.IP.Is6() {
				continue
			}
			f := Flow{Src: src, Dst: dst, Proto: proto, DstPort: port}
			eg, in := e.Explain(f, true), e.Explain(f, false)
			c := MatrixCell{From: podKey(src.Pod), To: podKey(dst.Pod), Allowed: eg.Allowed && in.Allowed}
			switch {
			case !eg.Allowed:
				c.Why = "egress: " + eg.Summary
			case !in.Allowed:
				c.Why = "ingress: " + in.Summary
			default:
				c.Why = "egress: " + eg.Summary + "; ingress: " + in.Summary
			}
			out.Cells = append(out.Cells, c)
		}
	}
	return out, nil
}

func podKey(p *Pod) string { return p.Namespace + "/" + p.Name }
