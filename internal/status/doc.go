// Package status is the report sluiced serves on /status and sluicectl
// status prints.
package status
