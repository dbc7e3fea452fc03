// Package routes owns the routes every overlay backend writes: they carry
// Protocol, so they are found again after a restart without touching anyone
// else's routes, and Sync writes only the difference between the wanted
// routes of a family and the kernel's, removing the ones no backend wants.
package routes
