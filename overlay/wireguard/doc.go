// Package wireguard is the encrypted overlay: one WireGuard device per
// family (flannel's "separate" mode) or one for both ("auto"), a peer
// entry per remote node (its public key, its underlay address and port,
// and its pod subnets as allowed IPs), and a route per remote subnet
// through the device.
//
// Two implementations sit behind one configuration path. Kernel uses the
// wireguard module, configured by wgctrl over generic netlink. Userspace
// runs golang.zx2c4.com/wireguard inside the agent over a TUN device, for
// kernels without the module; it is configured with the same wgctrl types
// and the same UAPI text wgctrl would send to its socket. Configure diffs
// the device's configuration against the wanted one for both, so a peer
// whose entry is right is never rewritten and its session goes on.
//
// Each node's private key lives in the agent's state directory (mode
// 0600) and its public key in the Node's flannel-format backend-data
// annotation, {"PublicKey": "..."}, where flannel's wireguard backend
// looks for it.
package wireguard
