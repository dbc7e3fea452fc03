package policy

import (
	"fmt"

	calicoselector "github.com/projectcalico/calico/libcalico-go/lib/selector"
	"k8s.io/apimachinery/pkg/labels"
)

// calicoSelector is a selector in Calico's language ("app == 'db' &&
// !has(canary)"), parsed by Calico's own parser so the traps are Calico's:
// `!=` and `not in` match an absent label, `all()` everything.
type calicoSelector struct {
	sel calicoselector.Selector
}

// ParseCalicoSelector parses a Calico selector; "" means all().
func ParseCalicoSelector(s string) (Selector, error) {
	sel, err := calicoselector.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("%q is not a valid selector: %w", s, err)
	}
	return calicoSelector{sel}, nil
}

// Matches evaluates the selector over a label set.
func (c calicoSelector) Matches(l labels.Labels) bool {
	return c.sel.EvaluateLabels(calicoLabels{l, nil})
}

// String is Calico's canonical form of the selector.
func (c calicoSelector) String() string { return c.sel.String() }

// Language tags the canonical form when it names sets (selectorID).
func (c calicoSelector) Language() string { return "calico" }

// calicoLabels adapts Kubernetes labels to Calico's label interface,
// which needs to tell an absent label from an empty one; added are the
// labels Calico itself gives the object, which win.
type calicoLabels struct {
	l     labels.Labels
	added labels.Set
}

func (c calicoLabels) Get(name string) (string, bool) {
	if v, ok := c.added[name]; ok {
		return v, true
	}
	if c.l == nil || !c.l.Has(name) {
		return "", false
	}
	return c.l.Get(name), true
}
