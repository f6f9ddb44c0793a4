package hsm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"os"
	"sync"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

// The shared token holds one key of every supported type, and two keys
// under one label. Tests that change a token make their own.
var shared struct {
	sync.Mutex
	tok *softhsmtest.Token
}

// Labels and IDs of the shared token's keys.
var sharedKeys = []struct {
	label string
	id    byte
	typ   softhsmtest.KeyType
}{
	{"rsa2048", 1, softhsmtest.RSA2048},
	{"p256", 2, softhsmtest.P256},
	{"p384", 3, softhsmtest.P384},
	{"p521", 4, softhsmtest.P521},
	{"ed25519", 5, softhsmtest.Ed25519},
	{"rsa3072", 6, softhsmtest.RSA3072},
	{"dup", 0x10, softhsmtest.P256},
	{"dup", 0x11, softhsmtest.P256},
}

func sharedToken(t testing.TB) *softhsmtest.Token {
	t.Helper()
	shared.Lock()
	defer shared.Unlock()
	if shared.tok == nil {
		tok := softhsmtest.NewToken(t, "shared")
		for _, k := range sharedKeys {
			tok.GenerateKey(t, k.typ, []byte{k.id}, k.label)
		}
		shared.tok = tok
	}
	return shared.tok
}

// openToken opens a provider on tok (directly on SoftHSM) and closes it when
// the test ends.
func openToken(t testing.TB, tok *softhsmtest.Token, mod ...func(*Config)) *Provider {
	t.Helper()
	cfg := Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN}
	for _, m := range mod {
		m(&cfg)
	}
	p, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open(%v): %v", cfg, err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return p
}

func openShared(t testing.TB, mod ...func(*Config)) *Provider {
	t.Helper()
	return openToken(t, sharedToken(t), mod...)
}

// forEachPath runs f on the shared token twice: with signatures and
// decryptions in two calls through the module's function list
// (fastsign.go), and through miekg/pkcs11's calls, the fallback for a module
// whose list cannot be validated.
func forEachPath(t *testing.T, f func(t *testing.T, p *Provider)) {
	for _, path := range []string{"two-call", "miekg"} {
		t.Run(path, func(t *testing.T) {
			p := openShared(t)
			if p.fast == nil {
				t.Fatal("the two-call path is off for SoftHSM")
			}
			if path == "miekg" {
				p.fast = nil // no operation has run yet
				p.inst.Load().fast = nil
			}
			f(t, p)
		})
	}
}

func mustSigner(t testing.TB, p *Provider, label string) *Signer {
	t.Helper()
	s, err := p.Signer(KeyRef{Label: label})
	if err != nil {
		t.Fatalf("Signer(%q): %v", label, err)
	}
	return s
}

// verify checks sig over digest (or message for Ed25519) with the standard
// library's verifier for pub.
func verify(pub crypto.PublicKey, digest, sig []byte, opts crypto.SignerOpts) error {
	switch pub := pub.(type) {
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			return rsa.VerifyPSS(pub, pss.Hash, digest, sig, pss)
		}
		return rsa.VerifyPKCS1v15(pub, opts.HashFunc(), digest, sig)
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest, sig) {
			return errors.New("ECDSA signature does not verify")
		}
		return nil
	case ed25519.PublicKey:
		if !ed25519.Verify(pub, digest, sig) {
			return errors.New("Ed25519 signature does not verify")
		}
		return nil
	}
	return errors.New("unknown public key type")
}

func hashOf(h crypto.Hash, msg []byte) []byte {
	if h == 0 {
		return msg
	}
	w := h.New()
	w.Write(msg)
	return w.Sum(nil)
}

// encryptTo encrypts secret to pub as a Decrypter with opts (nil, or
// *rsa.OAEPOptions) expects it.
func encryptTo(t testing.TB, pub *rsa.PublicKey, secret []byte, opts crypto.DecrypterOpts) []byte {
	t.Helper()
	var ct []byte
	var err error
	if o, ok := opts.(*rsa.OAEPOptions); ok {
		ct, err = rsa.EncryptOAEPWithOptions(rand.Reader, pub, secret, o)
	} else {
		//lint:ignore SA1019 crypto.Decrypter still defines PKCS #1 v1.5 decryption; tests need its ciphertexts.
		ct, err = rsa.EncryptPKCS1v15(rand.Reader, pub, secret)
	}
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// wantErr checks that err matches target with errors.Is and is an *Error.
func wantErr(t testing.TB, err, target error) *Error {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("error = %v, want one matching %v", err, target)
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not an *hsm.Error", err, err)
	}
	return e
}
