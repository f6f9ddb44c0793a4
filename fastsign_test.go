//go:build !windows

package hsm

import (
	"os"
	"regexp"
	"testing"
)

// TestFastPathLayout fails CI when the two-call path's assumption about
// miekg/pkcs11's unexported layout may no longer hold: go.mod requires
// another version than the one validated, or the path is refused for
// SoftHSM. (Test binaries record no dependency versions, so the version is
// read from go.mod; programs check the version they link at Open.)
func TestFastPathLayout(t *testing.T) {
	mod, err := os.ReadFile("go.mod")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^\s*github\.com/miekg/pkcs11 (\S+)`).FindSubmatch(mod)
	if m == nil || string(m[1]) != miekgValidated {
		t.Fatalf("go.mod requires github.com/miekg/pkcs11 %q, the two-call path is validated for %s: check the layout of its ctx struct (fastsign.go), then move miekgValidated", m, miekgValidated)
	}
	p := openShared(t)
	if p.fast == nil {
		_, why := fastList(p.ctx, p.mod.path)
		t.Fatalf("the two-call path is off for SoftHSM: %s", why)
	}
}
