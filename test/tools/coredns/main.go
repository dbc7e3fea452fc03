// Command coredns is CoreDNS v1.15.0 with only the plugins a lab cluster's
// DNS uses (the Corefile kubeadm writes): building the full plugin set
// would pull every cloud provider's SDK from the module proxy for nothing.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	// The plugins, registered by their init functions.
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// directives keeps upstream's order (core/dnsserver/zdirectives.go): a
// plugin's place in it, not in the Corefile, decides when it runs.
var directives = []string{
	"reload", "ready", "health", "errors", "log", "loadbalance",
	"cache", "kubernetes", "loop", "forward",
}

func init() { dnsserver.Directives = directives }

func main() { coremain.Run() }
