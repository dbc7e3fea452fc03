//go:build tools

// Package tools pins flanneld.
package tools

import _ "github.com/flannel-io/flannel"
