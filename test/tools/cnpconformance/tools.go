//go:build tools

// Package tools pins the network-policy-api conformance suite, which
// test/tools/build.sh compiles with `go test -c`.
package tools

import (
	_ "sigs.k8s.io/network-policy-api/conformance"
	_ "sigs.k8s.io/network-policy-api/conformance/tests"
	_ "sigs.k8s.io/network-policy-api/conformance/utils/suite"
)
