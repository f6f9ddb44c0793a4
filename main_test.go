package hsm

import (
	"os"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// TestMain gives the test binary a SoftHSM2 configuration of its own (a
// token directory in a temporary directory). The helpers the tests share
// are in helpers_test.go; docs/tests.md maps the test files.
func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }
