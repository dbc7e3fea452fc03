// Package ipset manages the ipsets of the policy loop over netlink.
// vishvananda/netlink creates, lists and destroys sets; entries are added
// and deleted with requests built here, because its entries cannot carry
// the nomatch flag that ipBlock's "except" needs.
package ipset
