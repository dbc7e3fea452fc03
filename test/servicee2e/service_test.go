package servicee2e

import (
	"testing"

	"github.com/sluice-net/sluice/internal/lab"
	"github.com/sluice-net/sluice/test/labtest"
)

// kube-proxy in iptables mode (the default), with the iptables-nft image.
func TestServicesIPTablesMode(t *testing.T) {
	c := startCluster(t, lab.ProxyIPTables, lab.ProxyBackendNFT)
	t.Run("ClusterIPNodePortHairpin", c.serviceTruthTable)
	t.Run("ExternalTrafficPolicy", c.externalTrafficPolicy)
	t.Run("DNSUnderDefaultDeny", c.dnsRecipe)
	// `make lab`'s demo: the pods probe each other by Service name.
	t.Run("DemoThroughServiceNames", func(t *testing.T) { labtest.AssertDemo(t, c.Lab) })
	t.Run("CoexistWithKubeProxyChains", func(t *testing.T) { c.coexistIPTables(t, "nft") })
	t.Run("RestartsKeepServiceConnections", func(t *testing.T) { c.restartsKeepConnections(t, "nft") })
	t.Run("CleanupLeavesKubeProxyRules", func(t *testing.T) { c.cleanupLeavesKubeProxy(t, "nft") })
}

// kube-proxy in nftables mode: no KUBE-* iptables chains at all.
func TestServicesNFTablesMode(t *testing.T) {
	c := startCluster(t, lab.ProxyNFTables, lab.ProxyBackendNFT)
	t.Run("ClusterIPNodePortHairpin", c.serviceTruthTable)
	t.Run("ExternalTrafficPolicy", c.externalTrafficPolicy)
	t.Run("DNSUnderDefaultDeny", c.dnsRecipe)
	t.Run("CoexistWithKubeProxyTables", c.coexistNFTables)
	t.Run("RestartsKeepServiceConnections", func(t *testing.T) { c.restartsKeepConnections(t, "nft") })
	t.Run("CleanupLeavesKubeProxyRules", func(t *testing.T) { c.cleanupLeavesKubeProxy(t, "") })
}

// A legacy node: kube-proxy's image and the kubelet use iptables-legacy,
// and Sluice's backend detection must follow them.
func TestServicesLegacyBackend(t *testing.T) {
	c := startCluster(t, lab.ProxyIPTables, lab.ProxyBackendLegacy)
	t.Run("BackendDetection", c.legacyDetection)
	t.Run("ClusterIPNodePortHairpin", c.serviceTruthTable)
	t.Run("CoexistWithKubeProxyChains", func(t *testing.T) { c.coexistIPTables(t, "legacy") })
	t.Run("CleanupLeavesKubeProxyRules", func(t *testing.T) { c.cleanupLeavesKubeProxy(t, "legacy") })
}
