// Package manifests holds the install manifest, embedded so that a lab
// applies the manifest its binaries were built with.
package manifests

import _ "embed"

// Sluice is manifests/sluice.yaml.
//
//go:embed sluice.yaml
var Sluice []byte
