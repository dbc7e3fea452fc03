package policy

import (
	"fmt"
	"sort"
	"strings"
)

// syncCause says, for the journal of kernel writes (sluicectl changes),
// what a sync acts on: the API objects that changed, the local endpoints,
// or a repair of drift the re-read found.
func syncCause(d dirtyKeys, endpoints, repairing bool) string {
	var events []string
	for _, set := range []struct {
		kind string
		keys map[string]bool
	}{{"policy", d.policies}, {"Pod", d.pods}, {"Namespace", d.namespaces}, {"network set", d.netsets}, {"ServiceAccount", d.serviceAccounts}} {
		keys := make([]string, 0, len(set.keys))
		for k := range set.keys {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			events = append(events, set.kind+" "+k+" changed")
		}
	}
	if d.tiers {
		events = append(events, "tiers changed")
	}
	if endpoints {
		events = append(events, "local endpoints changed (a pod started or stopped on this node)")
	}
	switch {
	case len(events) > 5:
		return strings.Join(events[:5], ", ") + fmt.Sprintf(" and %d more", len(events)-5)
	case len(events) > 0:
		return strings.Join(events, ", ")
	case repairing:
		return "drift repair: the re-read found the kernel changed"
	}
	return "resync"
}
