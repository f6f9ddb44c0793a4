package hsm

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/ce46d8f2/hsm/internal/pintest"
)

// TestReadPINShared: the core's pin-source reader passes the cases that
// stepkms's must pass too (see internal/pintest), and reads hsm's dialect
// where the two differ: the first line, absolute paths only.
func TestReadPINShared(t *testing.T) {
	pintest.Run(t, readPIN)

	dir := t.TempDir()
	t.Chdir(dir)
	for name, data := range map[string]string{"lines": "1234\nsecond line\n", "spaces": "1234 \n", "bom": "\ufeff1234\r\n"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct{ src, pin string }{
		{filepath.Join(dir, "lines"), "1234"},
		{filepath.Join(dir, "spaces"), "1234 "},
		{"file:" + filepath.Join(dir, "bom"), "1234"},
		{"lines", ""}, // relative: refused
		{"file:lines", ""},
	} {
		pin, err := readPIN(tt.src)
		if tt.pin == "" && err == nil || tt.pin != "" && (err != nil || pin != tt.pin) {
			t.Errorf("readPIN(%q) = %q, %v; want %q", tt.src, pin, err, tt.pin)
		}
	}
}
