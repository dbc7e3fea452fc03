package outagee2e

import (
	"testing"

	"github.com/sluice-net/sluice/test/labtest"
)

// TestMain removes the commands labtest built once the tests are done.
func TestMain(m *testing.M) { labtest.Run(m) }
