package stepkms

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/ce46d8f2/hsm/internal/pintest"
)

// TestReadPINShared: stepkms's pin-source reader passes the cases that the
// core's must pass too (see internal/pintest), and reads step's dialect
// where the two differ: the whole file without trailing white space, any
// path, file: URLs.
func TestReadPINShared(t *testing.T) {
	pintest.Run(t, readPIN)

	dir := t.TempDir()
	t.Chdir(dir)
	for name, data := range map[string]string{"spaces": "1234 \t\n\n", "relative": "5678\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct{ src, pin string }{
		{filepath.Join(dir, "spaces"), "1234"},
		{"relative", "5678"},
		{"file:relative", "5678"},
		{"file://" + filepath.Join(dir, "relative"), "5678"},
	} {
		if pin, err := readPIN(tt.src); err != nil || pin != tt.pin {
			t.Errorf("readPIN(%q) = %q, %v; want %q", tt.src, pin, err, tt.pin)
		}
	}
}
