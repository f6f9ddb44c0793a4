package hsmjwt_test

import (
	"os"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// TestMain gives the test binary a SoftHSM2 configuration of its own.
func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }
