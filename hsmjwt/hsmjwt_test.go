package hsmjwt_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha512"
	"encoding/asn1"
	"errors"
	"io"
	"math/big"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/hsmjwt"
	"github.com/golang-jwt/jwt/v5"
)

// memKeys are in-memory keys, generated once per test binary.
type memKeys struct {
	p256, p384, p521 *ecdsa.PrivateKey
	rsa2048, rsa1024 *rsa.PrivateKey
	ed               ed25519.PrivateKey
}

var mem = func() func(t *testing.T) *memKeys {
	var k *memKeys
	return func(t *testing.T) *memKeys {
		t.Helper()
		if k != nil {
			return k
		}
		k = &memKeys{}
		var err error
		for _, c := range []struct {
			dst   **ecdsa.PrivateKey
			curve elliptic.Curve
		}{{&k.p256, elliptic.P256()}, {&k.p384, elliptic.P384()}, {&k.p521, elliptic.P521()}} {
			if *c.dst, err = ecdsa.GenerateKey(c.curve, rand.Reader); err != nil {
				t.Fatal(err)
			}
		}
		if k.rsa2048, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			t.Fatal(err)
		}
		if k.rsa1024, err = rsa.GenerateKey(rand.Reader, 1024); err != nil {
			t.Fatal(err)
		}
		if _, k.ed, err = ed25519.GenerateKey(rand.Reader); err != nil {
			t.Fatal(err)
		}
		return k
	}
}()

func (k *memKeys) forMethod(m *hsmjwt.SigningMethod) crypto.Signer {
	switch m {
	case hsmjwt.ES256:
		return k.p256
	case hsmjwt.ES384:
		return k.p384
	case hsmjwt.ES512:
		return k.p521
	case hsmjwt.EdDSA:
		return k.ed
	}
	return k.rsa2048
}

func TestAlg(t *testing.T) {
	want := []string{"ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"}
	for i, m := range allMethods {
		if m.Alg() != want[i] {
			t.Errorf("Alg() = %q, want %q", m.Alg(), want[i])
		}
		var _ jwt.SigningMethod = m
	}
}

// TestRegistryUntouched checks that importing hsmjwt leaves golang-jwt's
// global registry with its standard methods.
func TestRegistryUntouched(t *testing.T) {
	std := map[string]jwt.SigningMethod{
		"ES256": jwt.SigningMethodES256, "ES384": jwt.SigningMethodES384, "ES512": jwt.SigningMethodES512,
		"RS256": jwt.SigningMethodRS256, "RS384": jwt.SigningMethodRS384, "RS512": jwt.SigningMethodRS512,
		"PS256": jwt.SigningMethodPS256, "PS384": jwt.SigningMethodPS384, "PS512": jwt.SigningMethodPS512,
		"EdDSA": jwt.SigningMethodEdDSA,
	}
	for alg, m := range std {
		if got := jwt.GetSigningMethod(alg); got != m {
			t.Errorf("jwt.GetSigningMethod(%q) = %T, want golang-jwt's own", alg, got)
		}
	}
}

// TestInMemory signs with in-memory keys and verifies with jwt.Parse; and
// the other way round, tokens signed by golang-jwt's own methods verify with
// Verify.
func TestInMemory(t *testing.T) {
	k := mem(t)
	for _, m := range allMethods {
		t.Run(m.Alg(), func(t *testing.T) {
			key := k.forMethod(m)
			checkRoundTrip(t, m, key)

			std := jwt.GetSigningMethod(m.Alg())
			s, err := jwt.NewWithClaims(std, claims()).SignedString(key)
			if err != nil {
				t.Fatal(err)
			}
			i := strings.LastIndexByte(s, '.')
			sig, err := jwt.NewParser().DecodeSegment(s[i+1:])
			if err != nil {
				t.Fatal(err)
			}
			if err := m.Verify(s[:i], sig, key.Public()); err != nil {
				t.Errorf("Verify of golang-jwt's own %s token: %v", m, err)
			}
			sig[len(sig)/2] ^= 1
			if err := m.Verify(s[:i], sig, key.Public()); err == nil {
				t.Errorf("Verify accepted a %s signature with a flipped bit", m)
			}
		})
	}
}

// TestPSSSalt checks that PS* sign with a salt as long as the hash, as
// golang-jwt does (RFC 7518 3.5): strict verification with that length
// accepts the signature.
func TestPSSSalt(t *testing.T) {
	k := mem(t).rsa2048
	for _, c := range []struct {
		m *hsmjwt.SigningMethod
		h crypto.Hash
	}{{hsmjwt.PS256, crypto.SHA256}, {hsmjwt.PS384, crypto.SHA384}, {hsmjwt.PS512, crypto.SHA512}} {
		sig, err := c.m.Sign("a.b", k)
		if err != nil {
			t.Fatal(err)
		}
		h := c.h.New()
		h.Write([]byte("a.b"))
		if err := rsa.VerifyPSS(&k.PublicKey, c.h, h.Sum(nil), sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}); err != nil {
			t.Errorf("%s: not a PSS signature with salt length = hash length: %v", c.m, err)
		}
	}
}

// TestECDSAPadding checks that r and s are zero-padded to the curve's size:
// with a real P-256 key until r is short (1 in 256 signatures), and with a
// signer returning r = 1, s = 2.
func TestECDSAPadding(t *testing.T) {
	k := mem(t).p256
	for i := 0; ; i++ {
		if i == 20000 {
			t.Fatal("no signature with a leading zero byte in 20000")
		}
		sig, err := hsmjwt.ES256.Sign("a.b", k)
		if err != nil {
			t.Fatal(err)
		}
		if len(sig) != 64 {
			t.Fatalf("%d-byte ES256 signature, want 64", len(sig))
		}
		if sig[0] == 0 || sig[32] == 0 {
			if err := jwt.SigningMethodES256.Verify("a.b", sig, &k.PublicKey); err != nil {
				t.Fatalf("zero-padded signature does not verify: %v", err)
			}
			break
		}
	}

	der, _ := asn1.Marshal(struct{ R, S *big.Int }{big.NewInt(1), big.NewInt(2)})
	for _, c := range []struct {
		m    *hsmjwt.SigningMethod
		pub  *ecdsa.PrivateKey
		size int
	}{{hsmjwt.ES256, mem(t).p256, 32}, {hsmjwt.ES384, mem(t).p384, 48}, {hsmjwt.ES512, mem(t).p521, 66}} {
		sig, err := c.m.Sign("a.b", &fixedSigner{pub: c.pub.Public(), sig: der})
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, 2*c.size)
		want[c.size-1], want[2*c.size-1] = 1, 2
		if string(sig) != string(want) {
			t.Errorf("%s of r=1 s=2: %x, want %x", c.m, sig, want)
		}
	}
}

// fixedSigner returns sig, and counts its calls.
type fixedSigner struct {
	pub   crypto.PublicKey
	sig   []byte
	err   error
	calls atomic.Int32
}

func (s *fixedSigner) Public() crypto.PublicKey { return s.pub }
func (s *fixedSigner) Sign(io.Reader, []byte, crypto.SignerOpts) ([]byte, error) {
	s.calls.Add(1)
	return s.sig, s.err
}

// zeroSigner's Public panics, as the zero value of a key struct may.
type zeroSigner struct{ k *ecdsa.PrivateKey }

func (s zeroSigner) Public() crypto.PublicKey { return s.k.Public() }
func (s zeroSigner) Sign(r io.Reader, d []byte, o crypto.SignerOpts) ([]byte, error) {
	return s.k.Sign(r, d, o)
}

// TestWrongKey: a key that does not fit the method is refused with
// jwt.ErrInvalidKeyType naming what is wrong, without a panic and without
// calling the signer.
func TestWrongKey(t *testing.T) {
	k := mem(t)
	p384 := &fixedSigner{pub: k.p384.Public()}
	rsaKey := &fixedSigner{pub: k.rsa2048.Public()}
	small := &fixedSigner{pub: k.rsa1024.Public()}
	ed := &fixedSigner{pub: k.ed.Public()}
	p256 := &fixedSigner{pub: k.p256.Public()}
	noCurve := &fixedSigner{pub: &ecdsa.PublicKey{}}
	noModulus := &fixedSigner{pub: &rsa.PublicKey{}}
	nilPub := &fixedSigner{}
	nilECDSAPub := &fixedSigner{pub: (*ecdsa.PublicKey)(nil)}
	stringPub := &fixedSigner{pub: "a public key"}
	shortEdPub := &fixedSigner{pub: ed25519.PublicKey{1, 2, 3}}
	counted := []*fixedSigner{p384, rsaKey, small, ed, p256, noCurve, noModulus, nilPub, nilECDSAPub, stringPub, shortEdPub}

	for _, c := range []struct {
		name    string
		m       *hsmjwt.SigningMethod
		key     any
		want    string
		invalid bool // also jwt.ErrInvalidKey
	}{
		{"P-384 for ES256", hsmjwt.ES256, k.p384, "ECDSA P-384 key", true},
		{"P-256 for ES384", hsmjwt.ES384, k.p256, "ECDSA P-256 key", true},
		{"P-384 for ES512", hsmjwt.ES512, k.p384, "ECDSA P-384 key", true},
		{"P-384 signer for ES256", hsmjwt.ES256, p384, "ECDSA P-384 key", true},
		{"RSA for ES256", hsmjwt.ES256, k.rsa2048, "RSA-2048 key", false},
		{"RSA signer for ES256", hsmjwt.ES256, rsaKey, "RSA-2048 key", false},
		{"Ed25519 for ES256", hsmjwt.ES256, k.ed, "Ed25519 key", false},
		{"ECDSA for RS256", hsmjwt.RS256, k.p256, "ECDSA P-256 key", false},
		{"ECDSA signer for PS384", hsmjwt.PS384, p256, "ECDSA P-256 key", false},
		{"Ed25519 for PS256", hsmjwt.PS256, ed, "Ed25519 key", false},
		{"RSA-1024 for RS256", hsmjwt.RS256, k.rsa1024, "at least 2048 bits", true},
		{"RSA-1024 signer for PS512", hsmjwt.PS512, small, "RSA-1024 key", true},
		{"RSA for EdDSA", hsmjwt.EdDSA, k.rsa2048, "RSA-2048 key", false},
		{"ECDSA for EdDSA", hsmjwt.EdDSA, k.p256, "ECDSA P-256 key", false},
		{"ECDSA without a curve", hsmjwt.ES256, noCurve, "without a curve", true},
		{"RSA without a modulus", hsmjwt.RS256, noModulus, "without a modulus", false},
		{"short Ed25519 public key", hsmjwt.EdDSA, shortEdPub, "3 bytes", true},
		{"nil", hsmjwt.ES256, nil, "nil", false},
		{"nil, EdDSA", hsmjwt.EdDSA, nil, "nil", false},
		{"typed nil *ecdsa.PrivateKey", hsmjwt.ES256, (*ecdsa.PrivateKey)(nil), "nil *ecdsa.PrivateKey", false},
		{"typed nil *rsa.PrivateKey", hsmjwt.RS256, (*rsa.PrivateKey)(nil), "nil *rsa.PrivateKey", false},
		{"nil ed25519.PrivateKey", hsmjwt.EdDSA, ed25519.PrivateKey(nil), "nil ed25519.PrivateKey", false},
		{"short ed25519.PrivateKey", hsmjwt.EdDSA, ed25519.PrivateKey{1, 2, 3}, "3 bytes", false},
		{"typed nil *hsm.Signer", hsmjwt.ES256, (*hsm.Signer)(nil), "nil *hsm.Signer", false},
		{"typed nil *hsm.DurableSigner", hsmjwt.RS256, (*hsm.DurableSigner)(nil), "nil *hsm.DurableSigner", false},
		{"zero *hsm.Signer", hsmjwt.ES256, &hsm.Signer{}, "no public key", false},
		{"zero key struct", hsmjwt.ES256, zeroSigner{}, "Public panicked", false},
		{"Public returns nil", hsmjwt.ES256, nilPub, "no public key", false},
		{"Public returns a nil *ecdsa.PublicKey", hsmjwt.ES256, nilECDSAPub, "no public key", false},
		{"Public returns a string", hsmjwt.RS256, stringPub, "public key of type string", false},
		{"not a signer: public key", hsmjwt.ES256, &k.p256.PublicKey, "*ecdsa.PublicKey is not a crypto.Signer", false},
		{"not a signer: HMAC secret", hsmjwt.RS256, []byte("secret"), "[]uint8 is not a crypto.Signer", false},
		{"not a signer: ecdsa.PrivateKey value", hsmjwt.ES256, *k.p256, "ecdsa.PrivateKey is not a crypto.Signer", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			sig, err := c.m.Sign("a.b", c.key)
			if err == nil {
				t.Fatalf("signed (%x)", sig)
			}
			if !errors.Is(err, jwt.ErrInvalidKeyType) || errors.Is(err, jwt.ErrInvalidKey) != c.invalid || !strings.Contains(err.Error(), c.want) || !strings.HasPrefix(err.Error(), "hsmjwt: "+c.m.Alg()+": ") {
				t.Errorf("error %q; want one matching jwt.ErrInvalidKeyType (and ErrInvalidKey: %v), naming %q", err, c.invalid, c.want)
			}
			if s, ok := c.key.(crypto.Signer); ok && s != nil {
				if _, err := hsmjwt.SignedString(context.Background(), jwt.NewWithClaims(c.m, claims()), s); !errors.Is(err, jwt.ErrInvalidKeyType) {
					t.Errorf("SignedString: %v, want jwt.ErrInvalidKeyType", err)
				}
			}
			// Through golang-jwt: the same error.
			if _, err := jwt.NewWithClaims(c.m, claims()).SignedString(c.key); !errors.Is(err, jwt.ErrInvalidKeyType) {
				t.Errorf("Token.SignedString: %v, want jwt.ErrInvalidKeyType", err)
			}
		})
	}
	for _, s := range counted {
		if n := s.calls.Load(); n != 0 {
			t.Errorf("a refused signer was called %d times", n)
		}
	}
}

// TestSignerError: the signer's error is returned, wrapped.
func TestSignerError(t *testing.T) {
	boom := errors.New("boom")
	k := mem(t)
	for _, m := range allMethods {
		s := &fixedSigner{pub: k.forMethod(m).Public(), err: boom}
		_, err := jwt.NewWithClaims(m, claims()).SignedString(s)
		if !errors.Is(err, boom) || errors.Is(err, jwt.ErrInvalidKeyType) {
			t.Errorf("%s: %v, want the signer's error", m, err)
		}
		if _, err := hsmjwt.SignedString(context.Background(), jwt.NewWithClaims(m, claims()), s); !errors.Is(err, boom) {
			t.Errorf("%s: SignedString: %v, want the signer's error", m, err)
		}
		if s.calls.Load() != 2 {
			t.Errorf("%s: signer called %d times, want 2", m, s.calls.Load())
		}
	}
}

// TestBadSignature: a signer returning something that is not a signature
// of its key's size is an error, not a token.
func TestBadSignature(t *testing.T) {
	k := mem(t)
	der := func(r, s *big.Int) []byte {
		b, err := asn1.Marshal(struct{ R, S *big.Int }{r, s})
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	n := elliptic.P256().Params().N
	good := der(big.NewInt(5), big.NewInt(7))
	for _, c := range []struct {
		name string
		m    *hsmjwt.SigningMethod
		pub  crypto.PublicKey
		sig  []byte
		want string
	}{
		{"not ASN.1", hsmjwt.ES256, k.p256.Public(), make([]byte, 64), "malformed"},
		{"trailing data", hsmjwt.ES256, k.p256.Public(), append(good, 0), "trailing data"},
		{"empty", hsmjwt.ES384, k.p384.Public(), nil, "malformed"},
		{"r = 0", hsmjwt.ES256, k.p256.Public(), der(big.NewInt(0), big.NewInt(7)), "out of range"},
		{"s negative", hsmjwt.ES256, k.p256.Public(), der(big.NewInt(5), big.NewInt(-7)), "out of range"},
		{"r = N", hsmjwt.ES256, k.p256.Public(), der(n, big.NewInt(7)), "out of range"},
		{"RSA too short", hsmjwt.RS256, k.rsa2048.Public(), make([]byte, 255), "255-byte RSA signature, want 256"},
		{"PSS too long", hsmjwt.PS256, k.rsa2048.Public(), make([]byte, 257), "257-byte RSA signature"},
		{"Ed25519 short", hsmjwt.EdDSA, k.ed.Public(), make([]byte, 63), "63-byte Ed25519 signature"},
	} {
		t.Run(c.name, func(t *testing.T) {
			sig, err := c.m.Sign("a.b", &fixedSigner{pub: c.pub, sig: c.sig})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Sign: %x, %v; want an error naming %q", sig, err, c.want)
			}
		})
	}
}

// ctxSigner has SignContext, as *hsm.DurableSigner has.
type ctxSigner struct {
	*ecdsa.PrivateKey
	got context.Context
}

type ctxKey struct{}

func (s *ctxSigner) SignContext(ctx context.Context, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	s.got = ctx
	return s.PrivateKey.Sign(rand.Reader, digest, opts)
}

func TestSignContext(t *testing.T) {
	k := mem(t)
	s := &ctxSigner{PrivateKey: k.p256}
	ctx := context.WithValue(context.Background(), ctxKey{}, "mine")
	tok, err := hsmjwt.SignedString(ctx, jwt.NewWithClaims(hsmjwt.ES256, claims()), s)
	if err != nil {
		t.Fatal(err)
	}
	parse(t, tok, k.p256.Public(), "ES256")
	if s.got == nil || s.got.Value(ctxKey{}) != "mine" {
		t.Errorf("SignContext of the signer was not called with the caller's context")
	}

	// Without SignContext the context is checked before signing.
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	f := &fixedSigner{pub: k.ed.Public()}
	if _, err := hsmjwt.EdDSA.SignContext(canceled, "a.b", f); !errors.Is(err, context.Canceled) || f.calls.Load() != 0 {
		t.Errorf("SignContext with a canceled context: %v, %d calls; want context.Canceled and none", err, f.calls.Load())
	}
	// Sign does not call SignContext (which may wait for an HSM).
	s.got = nil
	if _, err := hsmjwt.ES256.Sign("a.b", s); err != nil || s.got != nil {
		t.Errorf("Sign: %v; SignContext called: %v", err, s.got != nil)
	}
}

func TestSignedString(t *testing.T) {
	k := mem(t)
	ctx := context.Background()

	// A token from golang-jwt's own ES384 method, parsed and signed again.
	s, err := jwt.NewWithClaims(jwt.SigningMethodES384, claims()).SignedString(k.p384)
	if err != nil {
		t.Fatal(err)
	}
	tok := parse(t, s, k.p384.Public(), "ES384")
	s2, err := hsmjwt.SignedString(ctx, tok, &fixedSignerFor{k.p384})
	if err != nil {
		t.Fatal(err)
	}
	parse(t, s2, k.p384.Public(), "ES384")

	for _, c := range []struct {
		name string
		tok  *jwt.Token
		want string
	}{
		{"nil token", nil, "no signing method"},
		{"no method", &jwt.Token{}, "no signing method"},
		{"HS256", jwt.NewWithClaims(jwt.SigningMethodHS256, claims()), `"HS256" is not one`},
		{"none", jwt.NewWithClaims(jwt.SigningMethodNone, claims()), `"none" is not one`},
		{"header disagrees", func() *jwt.Token {
			t := jwt.NewWithClaims(hsmjwt.ES256, claims())
			t.Header["alg"] = "ES384"
			return t
		}(), "header says alg ES384"},
	} {
		if _, err := hsmjwt.SignedString(ctx, c.tok, k.p256); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want an error naming %q", c.name, err, c.want)
		}
	}
}

// fixedSignerFor hides the key's type: only crypto.Signer is left.
type fixedSignerFor struct{ k crypto.Signer }

func (s *fixedSignerFor) Public() crypto.PublicKey { return s.k.Public() }
func (s *fixedSignerFor) Sign(r io.Reader, d []byte, o crypto.SignerOpts) ([]byte, error) {
	return s.k.Sign(r, d, o)
}

func TestVerify(t *testing.T) {
	k := mem(t)
	sig, err := hsmjwt.ES256.Sign("a.b", k.p256)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []any{&k.p256.PublicKey, k.p256, &fixedSignerFor{k.p256}} {
		if err := hsmjwt.ES256.Verify("a.b", sig, key); err != nil {
			t.Errorf("Verify with %T: %v", key, err)
		}
	}
	if err := hsmjwt.ES256.Verify("a.c", sig, &k.p256.PublicKey); err == nil {
		t.Error("Verify accepted a signature over another string")
	}
	for _, key := range []any{nil, (*ecdsa.PrivateKey)(nil), (*hsm.Signer)(nil), &hsm.Signer{}, k.rsa2048, &k.rsa2048.PublicKey, "key", &fixedSigner{}} {
		if err := hsmjwt.ES256.Verify("a.b", sig, key); !errors.Is(err, jwt.ErrInvalidKeyType) {
			t.Errorf("Verify with %T: %v, want jwt.ErrInvalidKeyType", key, err)
		}
	}
	// The standard methods do not check the curve; nor does Verify, which
	// is theirs: a P-384 key fails on the signature's length.
	if err := hsmjwt.ES256.Verify("a.b", sig, &k.p384.PublicKey); err == nil {
		t.Error("Verify accepted a P-256 signature with a P-384 key")
	}

	// EdDSA and RS512, for the other families.
	edSig, err := hsmjwt.EdDSA.Sign("a.b", k.ed)
	if err != nil {
		t.Fatal(err)
	}
	if err := hsmjwt.EdDSA.Verify("a.b", edSig, k.ed); err != nil {
		t.Errorf("EdDSA Verify with the private key: %v", err)
	}
	if err := hsmjwt.EdDSA.Verify("a.b", edSig, ed25519.PrivateKey{1}); !errors.Is(err, jwt.ErrInvalidKeyType) {
		t.Errorf("EdDSA Verify with a short private key: %v", err)
	}
	rsSig, err := hsmjwt.RS512.Sign("a.b", k.rsa2048)
	if err != nil {
		t.Fatal(err)
	}
	h512 := sha512.Sum512([]byte("a.b"))
	if err := rsa.VerifyPKCS1v15(&k.rsa2048.PublicKey, crypto.SHA512, h512[:], rsSig); err != nil {
		t.Errorf("RS512 is not PKCS #1 v1.5 over SHA-512: %v", err)
	}
}

// TestZeroMethod: a SigningMethod not from this package fails, no panic.
func TestZeroMethod(t *testing.T) {
	var m hsmjwt.SigningMethod
	if _, err := m.Sign("a.b", mem(t).p256); err == nil {
		t.Error("zero SigningMethod signed")
	}
	if err := m.Verify("a.b", nil, mem(t).p256.Public()); err == nil {
		t.Error("zero SigningMethod verified")
	}
	var nilM *hsmjwt.SigningMethod
	if _, err := nilM.Sign("a.b", mem(t).p256); err == nil || nilM.Alg() != "" {
		t.Error("nil *SigningMethod signed")
	}
}
