package hsmjwt_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/hsmjwt"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/golang-jwt/jwt/v5"
)

// hsmKeys are the keys of the token TestHSM makes, by label.
var hsmKeys = []struct {
	typ   softhsmtest.KeyType
	id    byte
	label string
}{
	{softhsmtest.P256, 1, "p256"},
	{softhsmtest.P384, 2, "p384"},
	{softhsmtest.P521, 3, "p521"},
	{softhsmtest.RSA2048, 4, "rsa2048"},
	{softhsmtest.Ed25519, 5, "ed25519"},
}

// labelFor is the key of the token each method signs with.
var labelFor = map[*hsmjwt.SigningMethod]string{
	hsmjwt.ES256: "p256", hsmjwt.ES384: "p384", hsmjwt.ES512: "p521",
	hsmjwt.RS256: "rsa2048", hsmjwt.RS384: "rsa2048", hsmjwt.RS512: "rsa2048",
	hsmjwt.PS256: "rsa2048", hsmjwt.PS384: "rsa2048", hsmjwt.PS512: "rsa2048",
	hsmjwt.EdDSA: "ed25519",
}

// TestHSM signs with every method and keys of a real SoftHSM2 token, and
// verifies with plain jwt.Parse. One provider serves every subtest: a
// PKCS#11 module can be opened once per process at a time.
func TestHSM(t *testing.T) {
	tok := softhsmtest.NewToken(t, "jwt")
	for _, k := range hsmKeys {
		tok.GenerateKey(t, k.typ, []byte{k.id}, k.label)
	}
	p, err := hsm.Open(hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Error(err)
		}
	})
	signers := map[string]*hsm.Signer{}
	durables := map[string]*hsm.DurableSigner{}
	for _, k := range hsmKeys {
		ref := hsm.KeyRef{Label: k.label}
		if signers[k.label], err = p.Signer(ref); err != nil {
			t.Fatal(err)
		}
		if durables[k.label], err = p.DurableSigner(ref); err != nil {
			t.Fatal(err)
		}
	}

	for _, m := range allMethods {
		for _, kind := range []string{"Signer", "DurableSigner"} {
			t.Run(m.Alg()+"/"+kind, func(t *testing.T) {
				var key crypto.Signer = signers[labelFor[m]]
				if kind == "DurableSigner" {
					key = durables[labelFor[m]]
				}
				checkRoundTrip(t, m, key)
			})
		}
	}

	t.Run("P-521 signature is 132 bytes", func(t *testing.T) {
		for range 8 {
			sig, err := hsmjwt.ES512.Sign("header.payload", signers["p521"])
			if err != nil {
				t.Fatal(err)
			}
			// r and s are below the group order, 521 bits: the first
			// byte of each 66-byte half is 0 or 1.
			if len(sig) != 132 || sig[0] > 1 || sig[66] > 1 {
				t.Fatalf("ES512 signature: %d bytes, first bytes of r and s %#x %#x; want 132 bytes, each half zero-padded", len(sig), sig[0], sig[66])
			}
			if err := jwt.SigningMethodES512.Verify("header.payload", sig, signers["p521"].Public()); err != nil {
				t.Fatal(err)
			}
		}
	})

	t.Run("wrong HSM key", func(t *testing.T) {
		for _, c := range []struct {
			m     *hsmjwt.SigningMethod
			label string
			want  string
		}{
			{hsmjwt.ES256, "p384", "ECDSA P-384 key"},
			{hsmjwt.ES384, "p521", "ECDSA P-521 key"},
			{hsmjwt.ES512, "p256", "ECDSA P-256 key"},
			{hsmjwt.ES256, "rsa2048", "RSA-2048 key"},
			{hsmjwt.ES256, "ed25519", "Ed25519 key"},
			{hsmjwt.RS256, "p256", "ECDSA P-256 key"},
			{hsmjwt.PS256, "ed25519", "Ed25519 key"},
			{hsmjwt.EdDSA, "rsa2048", "RSA-2048 key"},
			{hsmjwt.EdDSA, "p256", "ECDSA P-256 key"},
		} {
			for _, key := range []crypto.Signer{signers[c.label], durables[c.label]} {
				_, err := jwt.NewWithClaims(c.m, claims()).SignedString(key)
				if !errors.Is(err, jwt.ErrInvalidKeyType) || !strings.Contains(err.Error(), c.want) {
					t.Errorf("%s with %v: %v; want jwt.ErrInvalidKeyType naming %q", c.m, key, err, c.want)
				}
			}
		}
	})

	t.Run("SignedString with context", func(t *testing.T) {
		s, err := hsmjwt.SignedString(context.Background(), jwt.NewWithClaims(hsmjwt.ES256, claims()), durables["p256"])
		if err != nil {
			t.Fatal(err)
		}
		parsed := parse(t, s, durables["p256"].Public(), "ES256")

		// A parsed token carries golang-jwt's standard method; SignedString
		// signs it again with the HSM key.
		parsed.Claims.(jwt.MapClaims)["sub"] = "bob"
		s2, err := hsmjwt.SignedString(context.Background(), parsed, signers["p256"])
		if err != nil {
			t.Fatal(err)
		}
		if got := parse(t, s2, signers["p256"].Public(), "ES256").Claims.(jwt.MapClaims)["sub"]; got != "bob" {
			t.Errorf("re-signed token has sub %v, want bob", got)
		}

		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if _, err := hsmjwt.SignedString(ctx, jwt.NewWithClaims(hsmjwt.EdDSA, claims()), durables["ed25519"]); !errors.Is(err, context.Canceled) {
			t.Errorf("SignedString with a canceled context: %v, want context.Canceled", err)
		}
	})

	// Last: it moves the provider to a new generation.
	t.Run("HSM error propagates", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := p.Reinitialize(ctx); err != nil {
			t.Fatal(err)
		}
		_, err := jwt.NewWithClaims(hsmjwt.ES256, claims()).SignedString(signers["p256"])
		if !errors.Is(err, hsm.ErrStaleKey) {
			t.Fatalf("stale *hsm.Signer: %v, want hsm.ErrStaleKey", err)
		}
		var e *hsm.Error
		if !errors.As(err, &e) {
			t.Errorf("stale *hsm.Signer: %v does not carry *hsm.Error", err)
		}
		// The durable key finds its key again in the new generation.
		checkRoundTrip(t, hsmjwt.ES256, durables["p256"])
		checkRoundTrip(t, hsmjwt.PS512, durables["rsa2048"])
		checkRoundTrip(t, hsmjwt.EdDSA, durables["ed25519"])
	})
}

var allMethods = []*hsmjwt.SigningMethod{
	hsmjwt.ES256, hsmjwt.ES384, hsmjwt.ES512,
	hsmjwt.RS256, hsmjwt.RS384, hsmjwt.RS512,
	hsmjwt.PS256, hsmjwt.PS384, hsmjwt.PS512,
	hsmjwt.EdDSA,
}

func claims() jwt.MapClaims {
	return jwt.MapClaims{"sub": "alice", "exp": time.Now().Add(time.Hour).Unix()}
}

// parse verifies s with plain jwt.Parse (golang-jwt's standard methods) and
// pub, accepting only alg.
func parse(t *testing.T, s string, pub crypto.PublicKey, alg string) *jwt.Token {
	t.Helper()
	tok, err := jwt.Parse(s, func(*jwt.Token) (any, error) { return pub, nil }, jwt.WithValidMethods([]string{alg}))
	if err != nil {
		t.Fatalf("jwt.Parse(%s token): %v", alg, err)
	}
	if tok.Method != jwt.GetSigningMethod(alg) {
		t.Fatalf("jwt.Parse verified with %T, want golang-jwt's standard %s method", tok.Method, alg)
	}
	return tok
}

// checkRoundTrip signs a token with m and key, verifies it with jwt.Parse,
// with m.Verify given the public key and given the signer, and checks the
// signature's size.
func checkRoundTrip(t *testing.T, m *hsmjwt.SigningMethod, key crypto.Signer) {
	t.Helper()
	s, err := jwt.NewWithClaims(m, claims()).SignedString(key)
	if err != nil {
		t.Fatalf("%s: SignedString: %v", m, err)
	}
	tok := parse(t, s, key.Public(), m.Alg())
	if sub, _ := tok.Claims.GetSubject(); sub != "alice" {
		t.Errorf("%s: sub %q, want alice", m, sub)
	}
	i := strings.LastIndexByte(s, '.')
	sig, err := jwt.NewParser().DecodeSegment(s[i+1:])
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []any{key.Public(), key} {
		if err := m.Verify(s[:i], sig, k); err != nil {
			t.Errorf("%s: Verify with %T: %v", m, k, err)
		}
	}
	var want int
	switch pub := key.Public().(type) {
	case *ecdsa.PublicKey:
		want = 2 * ((pub.Curve.Params().BitSize + 7) / 8)
	case *rsa.PublicKey:
		want = pub.Size()
	case ed25519.PublicKey:
		want = ed25519.SignatureSize
	}
	if len(sig) != want {
		t.Errorf("%s: %d-byte signature, want %d", m, len(sig), want)
	}
}

// TestRestrictedKey: RS256, RS512 and PS256 tokens signed by a key that the
// token allows only its hash-and-sign mechanisms (CKA_ALLOWED_MECHANISMS
// CKM_SHA256_RSA_PKCS, CKM_SHA512_RSA_PKCS, CKM_SHA256_RSA_PKCS_PSS): the
// signing string goes to the key whole (SignMessage), and plain jwt.Parse
// verifies the tokens. Hashing here and calling Sign would be refused.
func TestRestrictedKey(t *testing.T) {
	tok := softhsmtest.NewToken(t, "jwtrestricted")
	p, err := hsm.Open(hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Error(err)
		}
	})
	const (
		ckmSHA256RSAPKCS    = 0x40
		ckmSHA512RSAPKCS    = 0x42
		ckmSHA256RSAPKCSPSS = 0x43
	)
	gen, err := p.GenerateKey(hsm.KeySpec{Type: hsm.RSA2048, Label: "restricted",
		AllowedMechanisms: []uint{ckmSHA256RSAPKCS, ckmSHA512RSAPKCS, ckmSHA256RSAPKCSPSS}})
	if err != nil {
		t.Fatal(err)
	}
	ds, err := p.DurableSigner(gen.KeyRef())
	if err != nil {
		t.Fatal(err)
	}
	pub := ds.Public().(*rsa.PublicKey)
	for _, m := range []*hsmjwt.SigningMethod{hsmjwt.RS256, hsmjwt.RS512, hsmjwt.PS256} {
		for how, sign := range map[string]func() (string, error){
			"SignedString": func() (string, error) {
				return jwt.NewWithClaims(m, jwt.MapClaims{"sub": "restricted"}).SignedString(ds)
			},
			"SignedString with a context": func() (string, error) {
				return hsmjwt.SignedString(context.Background(), jwt.NewWithClaims(m, jwt.MapClaims{"sub": "restricted"}), ds)
			},
		} {
			s, err := sign()
			if err != nil {
				t.Fatalf("%s %s: %v", m.Alg(), how, err)
			}
			parsed, err := jwt.Parse(s, func(*jwt.Token) (any, error) { return pub, nil }, jwt.WithValidMethods([]string{m.Alg()}))
			if err != nil || !parsed.Valid {
				t.Fatalf("%s %s: jwt.Parse: %v", m.Alg(), how, err)
			}
		}
	}
	// The key refuses a digest: what hashing here would have asked for.
	digest := make([]byte, 32)
	if _, err := ds.Sign(nil, digest, crypto.SHA256); !errors.Is(err, hsm.ErrUnsupportedKey) {
		t.Fatalf("Sign of a digest with the restricted key: %v, want hsm.ErrUnsupportedKey", err)
	}
}
