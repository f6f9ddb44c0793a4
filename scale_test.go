package hsm

// The cost of a durable key's re-binding after a re-initialization as keys
// are added to the token (softhsmtest.ScaleSizes: HSM_SCALE, default
// "100,1000"; make bench runs "100,1000,5000"). Listing every key and
// looking one up, side by side with raw miekg/pkcs11 and crypto11, are
// measured by the compare module (compare/scale_test.go).

import (
	"fmt"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// BenchmarkScale: op=rebind re-binds one durable key after a
// re-initialization (the re-initialization is not timed).
func BenchmarkScale(b *testing.B) {
	softhsmtest.Require(b)
	for _, n := range softhsmtest.ScaleSizes(b) {
		tok := softhsmtest.ScaleToken(b, n)
		b.Run(fmt.Sprintf("keys=%d/op=rebind/eng=hsm", n), func(b *testing.B) {
			p, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1, DisableAutoRecovery: true})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { p.Close() })
			ds, err := p.DurableSigner(KeyRef{Label: softhsmtest.ScaleLabel(n / 2)})
			if err != nil {
				b.Fatal(err)
			}
			for b.Loop() {
				b.StopTimer()
				if err := p.Reinitialize(b.Context()); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if _, err := ds.d.bound(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
