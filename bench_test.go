package hsm

// Benchmarks of what hsm alone does: refusals and PKCS #1 v1.5 session-key
// decryption. The comparison with raw miekg/pkcs11 and crypto11 on the
// same keys, directly and through p11-kit, is the compare module's
// BenchmarkOps (compare/bench_test.go); make bench runs both and writes the
// tables in docs/performance.md.

import (
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"sync"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

var benchTok struct {
	sync.Mutex
	tok *softhsmtest.Token
}

// benchToken is a token with an RSA-2048 key "rsa" (id 02).
func benchToken(b *testing.B) *softhsmtest.Token {
	benchTok.Lock()
	defer benchTok.Unlock()
	if benchTok.tok == nil {
		tok := softhsmtest.NewToken(b, "bench")
		tok.GenerateKey(b, softhsmtest.RSA2048, []byte{2}, "rsa")
		benchTok.tok = tok
	}
	return benchTok.tok
}

var digest32 = sha256.Sum256([]byte("benchmark"))

// BenchmarkRefused: what a stale key, and a key of a provider that is
// unavailable, cost. Each refusal returns a prebuilt error, so the loop
// checks it by identity (errors.Is, checked once before, would cost more
// than the refusal).
func BenchmarkRefused(b *testing.B) {
	for _, why := range []string{"stale", "unavailable"} {
		// Named like BenchmarkOps's engines, for benchstat -col /eng.
		b.Run("why="+why+"/eng=hsm", func(b *testing.B) {
			p := openShared(b, func(c *Config) { c.DisableAutoRecovery = true; c.ProbeInterval = -1 })
			s := mustSigner(b, p, "p256")
			target := ErrStaleKey
			if why == "stale" {
				if err := p.Reinitialize(b.Context()); err != nil {
					b.Fatal(err)
				}
			} else {
				// What the first CKR_DEVICE_ERROR of an operation does.
				p.markLost(s.Generation(), &Error{Op: "sign", Code: pkcs11.CKR_DEVICE_ERROR, Err: pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)})
				target = ErrUnavailable
			}
			_, want := s.Sign(nil, digest32[:], crypto.SHA256)
			if !errors.Is(want, target) {
				b.Fatalf("got %v, want %v", want, target)
			}
			b.ReportAllocs()
			for b.Loop() {
				if _, err := s.Sign(nil, digest32[:], crypto.SHA256); err != want {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkSessionKey: PKCS #1 v1.5 decryption with SessionKeyLen (the TLS
// 1.2 RSA key exchange) of a valid ciphertext and of ciphertexts whose
// padding is bad or whose key has the wrong length, side by side: the same
// calls and the same path, so the same time within noise.
func BenchmarkSessionKey(b *testing.B) {
	tok := benchToken(b)
	p, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	d, err := p.Decrypter(KeyRef{Label: "rsa"})
	if err != nil {
		b.Fatal(err)
	}
	pub := d.Public().(*rsa.PublicKey)
	key := make([]byte, 32)
	for _, ct := range []struct {
		name string
		ct   []byte
	}{
		{"valid", encryptTo(b, pub, key, nil)},
		{"bad-padding", benchBadPadding(b, pub)},
		{"wrong-length", encryptTo(b, pub, key[:16], nil)},
	} {
		b.Run("ct="+ct.name, func(b *testing.B) {
			//lint:ignore SA1019 crypto/tls still passes these options for the TLS 1.2 RSA key exchange; the benchmark measures that path.
			opts := &rsa.PKCS1v15DecryptOptions{SessionKeyLen: len(key)}
			for b.Loop() {
				if _, err := d.Decrypt(nil, ct.ct, opts); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// benchBadPadding is a random number below the modulus: its decryption
// starts 0x00 0x02 with probability about 2^-16.
func benchBadPadding(b *testing.B, pub *rsa.PublicKey) []byte {
	n, err := rand.Int(rand.Reader, pub.N)
	if err != nil {
		b.Fatal(err)
	}
	return n.FillBytes(make([]byte, pub.Size()))
}
