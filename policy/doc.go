// Package policy is sluiced's policy loop: Kubernetes networking/v1
// NetworkPolicy and Calico's projectcalico.org/v3 policies, one tiered
// model, translated into per-veth iptables chains with ipsets.
//
// It owns, per IP family, the contents of SLUICE-FROM-POD and
// SLUICE-TO-POD and every chain and set they lead to, the hooks that send
// pod traffic through them (with package forward) and anti-spoofing, and
// the conntrack entries of flows a new deny cuts. The parts, in the order
// a change goes through them:
//
//   - sources.go: one source per API (networking/v1, projectcalico.org/v3,
//     Canal's crd.projectcalico.org/v1), informers and the objects Events
//     name;
//   - convert.go, calico.go, selector.go, nets.go: API objects into the
//     tiered model (model.go), whose reference semantics (eval.go, the
//     Evaluator) the rendered rules must agree with;
//   - index.go: the cluster state, which renders only what a change
//     touches (render.go and rules.go render a whole ruleset the same way);
//   - dataplane.go: writes a ruleset into the kernel through a
//     contract.RuleWriter, and reads it back;
//   - hooks.go, conntrack.go: the jumps into the chains, and cut flows;
//   - loop.go: the sync and its retries, the periodic re-read, Events and
//     status. The loop is the endpoint registry's
//     contract.EndpointProgrammer.
package policy
