// Package manifests holds the install manifest, embedded so that a lab
// applies the manifest its binaries were built with.
package manifests
