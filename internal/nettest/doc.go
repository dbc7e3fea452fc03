// Package nettest gives kernel tests their own network namespaces, named
// uniquely per test run and removed when the test ends, pass or fail.
package nettest
