package manifests

import _ "embed"

// Sluice is manifests/sluice.yaml.
//
//go:embed sluice.yaml
var Sluice []byte
