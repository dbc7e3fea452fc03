// Package netconf reads net-conf.json in flannel's format, so an operator
// moving from flannel or Canal keeps the file they have.
package netconf
