package hsm

// Benchmarks of the cost of lookups as keys are added to the token:
// listing every key, looking one up by label, re-binding a durable key
// after a re-initialization; raw miekg/pkcs11 (the physical limit: one find,
// one attribute read per object), crypto11 v1.6.2 and hsm side by side.
// HSM_SCALE sets the token sizes (default "100,1000"); make bench runs
// "100,1000,5000".

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/ThalesGroup/crypto11"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

var scaleTokens struct {
	sync.Mutex
	m map[int]*softhsmtest.Token
}

// scaleToken is a token with n ECDSA P-256 key pairs, labelled k00000 ...
// with IDs 00000 ..., made in this process through a raw miekg/pkcs11
// context (pkcs11-tool would take a process per key).
func scaleToken(b *testing.B, n int) *softhsmtest.Token {
	scaleTokens.Lock()
	defer scaleTokens.Unlock()
	if tok := scaleTokens.m[n]; tok != nil {
		return tok
	}
	tok := softhsmtest.NewToken(b, fmt.Sprintf("scale%d", n))
	r := openRawLogin(b, tok)
	defer r.close()
	ecParams := []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07} // P-256
	mech := []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_EC_KEY_PAIR_GEN, nil)}
	for i := range n {
		id, label := []byte(fmt.Sprintf("%05d", i)), scaleLabel(i)
		pub := []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_VERIFY, true),
			pkcs11.NewAttribute(pkcs11.CKA_EC_PARAMS, ecParams),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		}
		priv := []*pkcs11.Attribute{
			pkcs11.NewAttribute(pkcs11.CKA_TOKEN, true), pkcs11.NewAttribute(pkcs11.CKA_SIGN, true),
			pkcs11.NewAttribute(pkcs11.CKA_PRIVATE, true), pkcs11.NewAttribute(pkcs11.CKA_SENSITIVE, true),
			pkcs11.NewAttribute(pkcs11.CKA_ID, id), pkcs11.NewAttribute(pkcs11.CKA_LABEL, label),
		}
		if _, _, err := r.ctx.GenerateKeyPair(r.login, mech, pub, priv); err != nil {
			b.Fatalf("key %d of %d: %v", i, n, err)
		}
	}
	if scaleTokens.m == nil {
		scaleTokens.m = map[int]*softhsmtest.Token{}
	}
	scaleTokens.m[n] = tok
	return tok
}

func scaleLabel(i int) string { return fmt.Sprintf("k%05d", i) }

// openRawLogin is a raw miekg/pkcs11 context on tok, logged in.
func openRawLogin(b testing.TB, tok *softhsmtest.Token) *rawP11 {
	ctx := pkcs11.New(softhsmtest.SoftHSMModule)
	if err := ctx.Initialize(); err != nil {
		b.Fatal(err)
	}
	r := &rawP11{ctx: ctx, b: b}
	slots, err := ctx.GetSlotList(true)
	if err != nil {
		b.Fatal(err)
	}
	for _, s := range slots {
		if ti, err := ctx.GetTokenInfo(s); err == nil && ti.Label == tok.Label {
			r.slot = s
		}
	}
	if r.login, err = ctx.OpenSession(r.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION); err != nil {
		b.Fatal(err)
	}
	if err := ctx.Login(r.login, pkcs11.CKU_USER, tok.PIN); err != nil {
		b.Fatal(err)
	}
	return r
}

func scaleSizes(b *testing.B) []int {
	spec := os.Getenv("HSM_SCALE")
	if spec == "" {
		spec = "100,1000"
	}
	var sizes []int
	for _, f := range strings.Split(spec, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			b.Fatalf("HSM_SCALE=%q: %q is not a number of keys", spec, f)
		}
		sizes = append(sizes, n)
	}
	return sizes
}

// BenchmarkScale: op=list lists every key, op=lookup finds one key by label
// (a different one each time), op=rebind re-binds one durable key after a
// re-initialization (the re-initialization is not timed).
func BenchmarkScale(b *testing.B) {
	softhsmtest.Require(b)
	for _, n := range scaleSizes(b) {
		tok := scaleToken(b, n)
		b.Run(fmt.Sprintf("keys=%d/op=list/eng=raw", n), func(b *testing.B) {
			r := openRawLogin(b, tok)
			defer r.close()
			for b.Loop() {
				got := 0
				for _, class := range []uint{pkcs11.CKO_PRIVATE_KEY, pkcs11.CKO_PUBLIC_KEY} {
					objs := rawFind(b, r, []*pkcs11.Attribute{pkcs11.NewAttribute(pkcs11.CKA_CLASS, class)}, n+1)
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
			r := openRawLogin(b, tok)
			defer r.close()
			i := 0
			for b.Loop() {
				if objs := rawFind(b, r, refTemplate(pkcs11.CKO_PRIVATE_KEY, nil, scaleLabel(i%n)), 2); len(objs) != 1 {
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
				if _, err := p.Signer(KeyRef{Label: scaleLabel(i % n)}); err != nil {
					b.Fatal(err)
				}
				i += 7
			}
		})
		b.Run(fmt.Sprintf("keys=%d/op=rebind/eng=hsm", n), func(b *testing.B) {
			p := openScale(b, tok)
			ds, err := p.DurableSigner(KeyRef{Label: scaleLabel(n / 2)})
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
		b.Run(fmt.Sprintf("keys=%d/op=lookup/eng=crypto11", n), func(b *testing.B) {
			c, err := crypto11.Configure(&crypto11.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, Pin: tok.PIN})
			if err != nil {
				b.Fatal(err)
			}
			defer c.Close()
			i := 0
			for b.Loop() {
				s, err := c.FindKeyPair([]byte(fmt.Sprintf("%05d", i%n)), []byte(scaleLabel(i%n)))
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

func openScale(b *testing.B, tok *softhsmtest.Token) *Provider {
	p, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1, DisableAutoRecovery: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { p.Close() })
	return p
}

func rawFind(b *testing.B, r *rawP11, tmpl []*pkcs11.Attribute, max int) []pkcs11.ObjectHandle {
	if err := r.ctx.FindObjectsInit(r.login, tmpl); err != nil {
		b.Fatal(err)
	}
	objs, _, err := r.ctx.FindObjects(r.login, max)
	if ferr := r.ctx.FindObjectsFinal(r.login); err == nil {
		err = ferr
	}
	if err != nil {
		b.Fatal(err)
	}
	return objs
}
