package manifests

import _ "embed"

// ClusterNetworkPolicyCRDs is manifests/sluice-cnp-crds.yaml, the CRD
// sigs.k8s.io/network-policy-api publishes (internal/crdgen copies it).
//
//go:embed sluice-cnp-crds.yaml
var ClusterNetworkPolicyCRDs []byte
