package main

import "runtime/debug"

// version is stamped at build time (-ldflags "-X main.version=..."): the
// image's tag in the Dockerfile, `git describe` in make build.
var version string

// agentVersion is the stamped version, else the build as Go recorded it:
// the module version and, when built from a checkout with VCS stamping,
// the revision (short) and whether the tree was modified.
func agentVersion() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v, rev, dirty := bi.Main.Version, "", ""
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "-dirty"
			}
		}
	}
	if len(rev) > 12 {
		rev = rev[:12]
	}
	if rev != "" && (v == "" || v == "(devel)") {
		return rev + dirty
	}
	return v
}
