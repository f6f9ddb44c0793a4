package compare_test

// Benchmarks of the cost of lookups as keys are added to the token:
// listing every key and looking one up by label; raw miekg/pkcs11 (the
// physical limit: one find, one attribute read per object), crypto11 v1.6.2
// and hsm side by side. HSM_SCALE sets the token sizes (default
// "100,1000"); make bench runs "100,1000,5000". A durable key's re-binding,
// which only hsm does, is the core's BenchmarkScale.

import (
	"fmt"
	"testing"

	"github.com/ThalesGroup/crypto11"
	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

// BenchmarkScale: op=list lists every key, op=lookup finds one key by label
// (a different one each time).
func BenchmarkScale(b *testing.B) {
	softhsmtest.Require(b)
	for _, n := range softhsmtest.ScaleSizes(b) {
		tok := softhsmtest.ScaleToken(b, n)
		b.Run(fmt.Sprintf("keys=%d/op=list/eng=raw", n), func(b *testing.B) {
			r := openRaw(b, softhsmtest.SoftHSMModule, tok)
			defer r.close()
			for b.Loop() {
				got := 0
				for _, class := range []uint{pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
					objs := r.find([]*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)}, n+1)
					for _, h := range objs {
						if _, err := r.ctx.GetAttributeValue(r.login, h, []*pkcs11.Attribute{
							pkcs11.NewAttribute(pkcs11.CKA_ID, nil), pkcs11.NewAttribute(pkcs11.CKA_LABEL, nil)}); err != nil {
							b.Fatal(err)
						}
					}
					got += len(objs)
				}
				if got != 2*n {
					b.Fatalf("%d objects, want %d", got, 2*n)
				}
			}
		})
		b.Run(fmt.Sprintf("keys=%d/op=lookup/eng=raw", n), func(b *testing.B) {
			r := openRaw(b, softhsmtest.SoftHSMModule, tok)
			defer r.close()
			i := 0
			for b.Loop() {
				if objs := r.find(privateKeyTemplate(softhsmtest.ScaleLabel(i%n)), 2); len(objs) != 1 {
					b.Fatalf("%d objects", len(objs))
				}
				i += 7
			}
		})
		b.Run(fmt.Sprintf("keys=%d/op=list/eng=hsm", n), func(b *testing.B) {
			p := openScale(b, tok)
			for b.Loop() {
				keys, err := p.Keys()
				if err != nil || len(keys) != n {
					b.Fatalf("%d keys, %v", len(keys), err)
				}
			}
		})
		b.Run(fmt.Sprintf("keys=%d/op=lookup/eng=hsm", n), func(b *testing.B) {
			p := openScale(b, tok)
			i := 0
			for b.Loop() {
				if _, err := p.Signer(hsm.KeyRef{Label: softhsmtest.ScaleLabel(i % n)}); err != nil {
					b.Fatal(err)
				}
				i += 7
			}
		})
		b.Run(fmt.Sprintf("keys=%d/op=lookup/eng=crypto11", n), func(b *testing.B) {
			c, err := crypto11.Configure(&crypto11.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, Pin: tok.PIN})
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			i := 0
			for b.Loop() {
				s, err := c.FindKeyPair(softhsmtest.ScaleID(i%n), []byte(softhsmtest.ScaleLabel(i%n)))
				if err != nil || s == nil {
					b.Fatal(err)
				}
				i += 7
			}
		})
		if n <= 100 { // 48 s for 1,003 keys (issue #15): only where it is quick
			b.Run(fmt.Sprintf("keys=%d/op=list/eng=crypto11", n), func(b *testing.B) {
				c, err := crypto11.Configure(&crypto11.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, Pin: tok.PIN})
				if err != nil {
					b.Fatal(err)
				}
				defer c.Close()
				for b.Loop() {
					if keys, err := c.FindAllKeyPairs(); err != nil || len(keys) != n {
						b.Fatalf("%d keys, %v", len(keys), err)
					}
				}
			})
		}
	}
}

func openScale(b *testing.B, tok *softhsmtest.Token) *hsm.Provider {
	p, err := hsm.Open(hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1, DisableAutoRecovery: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}
