// Package iptables writes Sluice's own chains. Whole chains are rendered and
// applied with one `iptables-restore --noflush` per table: declaring a chain
// flushes only that chain, so rules of other programs are never touched. The
// few jumps from built-in chains are kept with check-then-insert, tagged with
// a comment that says whose they are.
package iptables
