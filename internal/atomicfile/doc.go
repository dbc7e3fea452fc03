// Package atomicfile writes files so that readers never see a partial one.
package atomicfile
