package policy

// Explain answers "why can (or can't) A reach B?" from the agent's own
// model: the reference evaluator's verdict for each direction, and what
// decided it (the tier, the policy, the rule index and its action, or the
// end of a tier, or no policy at all). It names the policies that
// selected the endpoint and did not match, and what the staged policies
// would change. explaincheck.go then holds the verdict against the
// kernel: the deciding rule's packet counters and whether the endpoint's
// chains are the ones rendered.

import (
	"fmt"
	"slices"
	"strings"
)

// The reasons a direction was decided.
const (
	// ReasonNotAPod: the local end is not a pod, so no policy applies.
	ReasonNotAPod = "not-a-pod"
	// ReasonSelf: a pod talking to itself is never subject to policy.
	ReasonSelf = "self"
	// ReasonOpen: no policy selects the pod in this direction.
	ReasonOpen = "open"
	// ReasonRule: a rule's Allow or Deny decided.
	ReasonRule = "rule"
	// ReasonEndOfTier: the pod is isolated and no rule of the tier
	// allowed the flow, so the tier's default Deny applied.
	ReasonEndOfTier = "end-of-tier"
	// ReasonAllPassed: every tier that selects the pod passed the flow on.
	ReasonAllPassed = "all-tiers-passed"
	// ReasonOwnNode: a pod's traffic to its own node, which only
	// ClusterNetworkPolicy decides (hosttraffic.go), and none does.
	ReasonOwnNode = "own-node"
)

// PolicyRef names a policy for people: its kind, namespace and name, and
// the model key the agent uses.
type PolicyRef struct {
	Kind      string `json:"kind"`
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name"`
	Key       string `json:"key"`
	Tier      string `json:"tier"`
}

func (r PolicyRef) String() string {
	if r.Namespace == "" {
		return r.Kind + " " + r.Name
	}
	return r.Kind + " " + r.Namespace + "/" + r.Name
}

// RefOf names a policy by its key: "namespace/name" is a networking/v1
// NetworkPolicy, the other kinds carry "Kind.group/" in front.
func RefOf(p *Policy) PolicyRef {
	ref := PolicyRef{Kind: "NetworkPolicy", Key: p.Key, Name: p.Name, Namespace: p.Namespace, Tier: p.tier().Name}
	if kind, _, ok := strings.Cut(p.Key, "/"); ok && strings.Contains(kind, ".") {
		ref.Kind = kind
	}
	if ref.Name == "" {
		ref.Name = p.Key
	}
	return ref
}

// DirectionVerdict is one direction's answer: egress is decided on the
// source's node, ingress on the destination's.
type DirectionVerdict struct {
	Direction string `json:"direction"`
	// Endpoint is the pod whose policy applies (namespace/name), "" when
	// that end is not a pod.
	Endpoint string `json:"endpoint,omitempty"`
	Allowed  bool   `json:"allowed"`
	Reason   string `json:"reason"`
	// ToOwnNode says this is egress to the pod's own node: filter INPUT,
	// where only ClusterNetworkPolicy decides, not FORWARD.
	ToOwnNode bool `json:"toOwnNode,omitempty"`
	// Tier, Policy, Rule (the index in the policy's rules of this
	// direction; -1 for none) and Action say what decided.
	Tier    string     `json:"tier,omitempty"`
	Policy  *PolicyRef `json:"policy,omitempty"`
	Rule    int        `json:"rule"`
	Action  Action     `json:"action,omitempty"`
	Summary string     `json:"summary"`
	// NotMatched are the policies that selected the endpoint and had no
	// rule matching the flow; Passed those whose Pass rule sent it on.
	NotMatched []PolicyRef `json:"notMatched,omitempty"`
	Passed     []PolicyRef `json:"passed,omitempty"`
	// Logged are the Log rules the flow hit.
	Logged []LogHit `json:"logged,omitempty"`
	// Staged says what the staged policies would change, "" for nothing.
	Staged string `json:"staged,omitempty"`
	// Kernel is the node's side of the story; nil when the endpoint is
	// not on the node that answered.
	Kernel *KernelCheck `json:"kernel,omitempty"`
}

// Explain explains one direction of a flow by the evaluator's model.
func (e *Evaluator) Explain(f Flow, egress bool) DirectionVerdict {
	self := f.Dst
	v := DirectionVerdict{Direction: "ingress", Rule: -1}
	if egress {
		self, v.Direction = f.Src, "egress"
	}
	if self.Pod != nil {
		v.Endpoint = self.Pod.Namespace + "/" + self.Pod.Name
	}
	d := e.decide(f, egress)
	v.Allowed, v.Tier, v.Logged = d.Allowed, d.Tier, d.Logged
	switch {
	case self.Pod == nil:
		v.Reason, v.Summary = ReasonNotAPod, "not a pod: no policy applies"
		return v
	case f.Src.Pod != nil && f.Src.Pod == f.Dst.Pod:
		v.Allowed, v.Reason, v.Summary = true, ReasonSelf, "a pod reaching itself: no policy applies"
		return v
	}
	selecting := e.selecting(self, egress)
	if egress && f.ToOwnNode {
		selecting, v.ToOwnNode = hostPolicies(selecting), true
	}
	for _, p := range selecting {
		i, action := e.decidingRule(p, f, egress)
		switch {
		case p.Key == d.Policy:
			ref := RefOf(p)
			v.Policy, v.Rule, v.Action = &ref, i, action
		case i < 0:
			v.NotMatched = append(v.NotMatched, RefOf(p))
		case action == Pass:
			v.Passed = append(v.Passed, RefOf(p))
		}
	}
	switch {
	case len(selecting) == 0 && egress && f.ToOwnNode:
		v.Reason, v.Summary = ReasonOwnNode, "to its own node, which only ClusterNetworkPolicy decides, and none does (allowed)"
	case len(selecting) == 0:
		v.Reason, v.Summary = ReasonOpen, "no policy selects the pod (open)"
	case v.Policy != nil:
		v.Reason = ReasonRule
		v.Summary = fmt.Sprintf("%s: tier %s, %s, %s rule %d", v.Action, v.Tier, v.Policy, v.Direction, v.Rule)
	case !d.Allowed:
		v.Reason, v.Summary = ReasonEndOfTier, fmt.Sprintf("isolated, no rule allowed it (end of tier %s)", d.Tier)
	default:
		v.Reason, v.Summary = ReasonAllPassed, "every tier that selects the pod passed it on (allowed)"
	}
	if v.ToOwnNode && v.Reason != ReasonOwnNode {
		v.Summary = "to its own node: " + v.Summary
	}
	v.Staged = e.stagedChange(f, egress, d)
	return v
}

// selecting returns the enforced policies that select an endpoint in a
// direction, in the order they apply.
func (e *Evaluator) selecting(self Endpoint, egress bool) []*Policy {
	var out []*Policy
	for _, p := range e.Policies {
		if p.Staged && !e.Staged {
			continue
		}
		if (egress && p.Egress || !egress && p.Ingress) && p.Selects(self.Pod, self.Namespace) {
			out = append(out, p)
		}
	}
	slices.SortFunc(out, comparePolicies)
	return out
}

// decidingRule returns the index and action of a policy's first rule
// that matches the flow and ends its walk (Allow, Deny or Pass; Log goes
// on), or -1. When the evaluator says the policy decided, this is the
// rule that did: walkTier stops at the same one.
func (e *Evaluator) decidingRule(p *Policy, f Flow, egress bool) (int, Action) {
	rules := p.IngressRules
	if egress {
		rules = p.EgressRules
	}
	for i := range rules {
		if a := rules[i].action(); a != Log && e.ruleMatches(&rules[i], f) {
			return i, a
		}
	}
	return -1, ""
}

// stagedChange says what the staged policies would change about a
// direction's decision, "" when they would change nothing.
func (e *Evaluator) stagedChange(f Flow, egress bool, enforced Decision) string {
	if e.Staged || !slices.ContainsFunc(e.Policies, func(p *Policy) bool { return p.Staged }) {
		return ""
	}
	staged := *e
	staged.Staged = true
	d := staged.decide(f, egress)
	if d.Allowed == enforced.Allowed && d.Policy == enforced.Policy && d.Tier == enforced.Tier {
		return ""
	}
	verdict := map[bool]string{true: "allowed", false: "denied"}[d.Allowed]
	if d.Policy == "" {
		return fmt.Sprintf("with staged policies enforced: %s at the end of tier %s", verdict, d.Tier)
	}
	return fmt.Sprintf("with staged policies enforced: %s by %s", verdict, d.Policy)
}
