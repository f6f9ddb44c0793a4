// Package hsmjwt gives golang-jwt v5 (github.com/golang-jwt/jwt/v5) signing
// methods that sign with any crypto.Signer: a key in an HSM (*hsm.Signer,
// *hsm.DurableSigner), or an in-memory *ecdsa.PrivateKey, *rsa.PrivateKey or
// ed25519.PrivateKey.
//
//	token := jwt.NewWithClaims(hsmjwt.ES256, jwt.MapClaims{"sub": "alice"})
//	s, err := token.SignedString(signer) // any crypto.Signer with a P-256 key
//
// golang-jwt's own methods sign only with in-memory keys of its own types
// (*ecdsa.PrivateKey, *rsa.PrivateKey); the methods here take the key's
// crypto.Signer interface and produce exactly the signatures those methods
// produce: ES256, ES384, ES512 as JWS's fixed-size r||s (RFC 7518 3.4,
// converted from the ASN.1 DER that crypto.Signer returns); RS256, RS384,
// RS512 as RSASSA-PKCS1-v1_5; PS256, PS384, PS512 as RSASSA-PSS with a salt
// as long as the hash (what golang-jwt signs with); EdDSA as Ed25519.
//
// Alg returns the standard names, so a token signed here is verified by
// jwt.Parse with golang-jwt's standard methods and the public key; nothing
// else is needed on the verifying side. Verify delegates to the standard
// method of the same name.
//
// The package does not call jwt.RegisterSigningMethod: golang-jwt's registry
// is global, and replacing "ES256" and the others there would change how
// every package of the process signs and verifies. jwt.Parse does not need
// it (it verifies with the standard methods). To sign a token that came from
// jwt.Parse, whose Method is a standard one, use SignedString, which picks
// the method of this package by the token's algorithm, or set token.Method.
//
// A key of the wrong type, curve or size for a method is refused before the
// signer is called, with an error matching jwt.ErrInvalidKeyType (and
// jwt.ErrInvalidKey for a wrong curve or size, as golang-jwt's ES methods
// return), never a panic: nil, a typed nil such as (*hsm.Signer)(nil), a
// signer whose Public returns nil or an unexpected type. An error of the
// signer (hsm.ErrUnavailable, hsm.ErrStaleKey, ...) is returned wrapped, so
// errors.Is sees it.
package hsmjwt

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	_ "crypto/sha256" // SHA-256 for ES256, RS256, PS256
	_ "crypto/sha512" // SHA-384 and SHA-512
	"encoding/asn1"
	"errors"
	"fmt"
	"math/big"
	"reflect"

	"github.com/ce46d8f2/hsm"
	"github.com/golang-jwt/jwt/v5"
)

// MinRSABits is the smallest RSA modulus the RS and PS methods sign with:
// RFC 7518 (3.3, 3.5) says a key of 2048 bits or larger MUST be used.
const MinRSABits = 2048

type family int

const (
	familyECDSA family = iota
	familyRSA
	familyPSS
	familyEd25519
)

// SigningMethod is a golang-jwt v5 signing method (jwt.SigningMethod) that
// signs with a crypto.Signer. Use the package's variables ES256, ..., EdDSA;
// they are safe for concurrent use.
type SigningMethod struct {
	alg    string
	family family
	hash   crypto.Hash    // crypto.Hash(0) for EdDSA
	curve  elliptic.Curve // ECDSA only
	std    jwt.SigningMethod
}

// The signing methods, one per JWS algorithm of golang-jwt that signs with
// a private key. Alg returns the standard name.
var (
	ES256 = &SigningMethod{alg: "ES256", family: familyECDSA, hash: crypto.SHA256, curve: elliptic.P256(), std: jwt.SigningMethodES256}
	ES384 = &SigningMethod{alg: "ES384", family: familyECDSA, hash: crypto.SHA384, curve: elliptic.P384(), std: jwt.SigningMethodES384}
	ES512 = &SigningMethod{alg: "ES512", family: familyECDSA, hash: crypto.SHA512, curve: elliptic.P521(), std: jwt.SigningMethodES512}
	RS256 = &SigningMethod{alg: "RS256", family: familyRSA, hash: crypto.SHA256, std: jwt.SigningMethodRS256}
	RS384 = &SigningMethod{alg: "RS384", family: familyRSA, hash: crypto.SHA384, std: jwt.SigningMethodRS384}
	RS512 = &SigningMethod{alg: "RS512", family: familyRSA, hash: crypto.SHA512, std: jwt.SigningMethodRS512}
	PS256 = &SigningMethod{alg: "PS256", family: familyPSS, hash: crypto.SHA256, std: jwt.SigningMethodPS256}
	PS384 = &SigningMethod{alg: "PS384", family: familyPSS, hash: crypto.SHA384, std: jwt.SigningMethodPS384}
	PS512 = &SigningMethod{alg: "PS512", family: familyPSS, hash: crypto.SHA512, std: jwt.SigningMethodPS512}
	EdDSA = &SigningMethod{alg: "EdDSA", family: familyEd25519, std: jwt.SigningMethodEdDSA}
)

var methods = []*SigningMethod{ES256, ES384, ES512, RS256, RS384, RS512, PS256, PS384, PS512, EdDSA}

// Alg returns the JWS algorithm name: "ES256", ..., "EdDSA".
func (m *SigningMethod) Alg() string {
	if m == nil {
		return ""
	}
	return m.alg
}

// String returns Alg.
func (m *SigningMethod) String() string { return m.Alg() }

// Sign signs signingString with key, which must be a crypto.Signer whose
// public key fits the method: an ECDSA key on the method's curve (P-256 for
// ES256, P-384 for ES384, P-521 for ES512), an RSA key of at least
// MinRSABits for RS and PS, an Ed25519 key for EdDSA. It hashes
// signingString (EdDSA: passes it whole, with crypto.Hash(0)), calls the
// signer's Sign once and returns the signature as JWS encodes it; an ECDSA
// signature is always twice the curve's size in bytes (132 for P-521),
// zero-padded on the left.
//
// A wrong key fails with an error matching jwt.ErrInvalidKeyType without
// calling the signer. An error of the signer is returned wrapped. Sign
// blocks as long as the signer does (an HSM round trip); it is safe for
// concurrent use when the signer is. It does not wait for an HSM that is
// unavailable: *hsm.DurableSigner fails fast, see SignContext.
func (m *SigningMethod) Sign(signingString string, key any) ([]byte, error) {
	return m.sign(context.Background(), false, signingString, key)
}

// SignContext is Sign with a context. If key is an hsm.ContextSigner, as
// every key of package hsm is (a durable or group key waits, until ctx
// ends, for an unavailable HSM to come back), its SignContext is called
// instead of Sign (its SignMessageContext, for a key of package hsm, which
// has it); Sign never calls them.
//
// For ES*, RS* and PS*, a key that is a crypto.MessageSigner (every key of
// package hsm) is given the whole signing string, so that a key restricted
// to the token's hash-and-sign mechanisms (CKA_ALLOWED_MECHANISMS) signs
// with them; the signature is the same as over the digest.
// Otherwise ctx is only checked before signing. An error of ctx is returned
// wrapped.
func (m *SigningMethod) SignContext(ctx context.Context, signingString string, key crypto.Signer) ([]byte, error) {
	return m.sign(ctx, true, signingString, key)
}

// messageContextSigner is what every key of package hsm also has:
// crypto.MessageSigner's SignMessage under a context.
type messageContextSigner interface {
	SignMessageContext(ctx context.Context, msg []byte, opts crypto.SignerOpts) ([]byte, error)
}

var errZeroMethod = errors.New("hsmjwt: a zero SigningMethod; use ES256, ..., EdDSA")

// sign is SignContext when useCtx is true, Sign otherwise.
func (m *SigningMethod) sign(ctx context.Context, useCtx bool, signingString string, key any) ([]byte, error) {
	if m == nil || m.std == nil {
		return nil, errZeroMethod
	}
	s, pub, err := m.signerOf(key)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("hsmjwt: %s: %w", m.alg, err)
	}

	var digest []byte
	var opts crypto.SignerOpts = m.hash
	if m.family == familyEd25519 {
		digest = []byte(signingString)
	} else {
		h := m.hash.New()
		h.Write([]byte(signingString))
		digest = h.Sum(nil)
	}
	if m.family == familyPSS {
		opts = &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: m.hash}
	}

	var sig []byte
	ms, isMessageSigner := s.(crypto.MessageSigner)
	msc, isContextMessageSigner := s.(messageContextSigner)
	switch cs, isContextSigner := s.(hsm.ContextSigner); {
	case m.family != familyEd25519 && useCtx && isContextMessageSigner:
		// The whole signing string to the key, which may sign it with
		// the token's hash-and-sign mechanism (a key restricted to them).
		sig, err = msc.SignMessageContext(ctx, []byte(signingString), opts)
	case m.family != familyEd25519 && isMessageSigner && (!useCtx || !isContextSigner):
		sig, err = ms.SignMessage(rand.Reader, []byte(signingString), opts)
	case useCtx && isContextSigner:
		sig, err = cs.SignContext(ctx, digest, opts)
	default:
		sig, err = s.Sign(rand.Reader, digest, opts)
	}
	if err != nil {
		return nil, fmt.Errorf("hsmjwt: %s: sign with %T: %w", m.alg, s, err)
	}

	switch m.family {
	case familyECDSA:
		out, err := fixedSize(sig, m.curve)
		if err != nil {
			return nil, fmt.Errorf("hsmjwt: %s: %T returned %w", m.alg, s, err)
		}
		return out, nil
	case familyRSA, familyPSS:
		if want := (pub.(*rsa.PublicKey).N.BitLen() + 7) / 8; len(sig) != want {
			return nil, fmt.Errorf("hsmjwt: %s: %T returned a %d-byte RSA signature, want %d bytes", m.alg, s, len(sig), want)
		}
	case familyEd25519:
		if len(sig) != ed25519.SignatureSize {
			return nil, fmt.Errorf("hsmjwt: %s: %T returned a %d-byte Ed25519 signature, want %d bytes", m.alg, s, len(sig), ed25519.SignatureSize)
		}
	}
	return sig, nil
}

// signerOf checks that key is a crypto.Signer whose public key fits m.
func (m *SigningMethod) signerOf(key any) (crypto.Signer, crypto.PublicKey, error) {
	s, ok := key.(crypto.Signer)
	if !ok {
		if key == nil {
			return nil, nil, m.keyErr(false, "the key is nil")
		}
		return nil, nil, m.keyErr(false, "%T is not a crypto.Signer", key)
	}
	pub, err := publicOf(s)
	if err != nil {
		return nil, nil, m.keyErr(false, "%v", err)
	}
	switch m.family {
	case familyECDSA:
		want := m.curve.Params()
		k, ok := pub.(*ecdsa.PublicKey)
		if !ok || k == nil {
			return nil, nil, m.keyErr(false, "%s signs with an ECDSA %s key; %T has %s", m.alg, want.Name, s, describe(pub))
		}
		if !sameCurve(k.Curve, m.curve) {
			return nil, nil, m.keyErr(true, "%s signs with an ECDSA %s key; %T has %s", m.alg, want.Name, s, describe(pub))
		}
	case familyRSA, familyPSS:
		k, ok := pub.(*rsa.PublicKey)
		if !ok || k == nil || k.N == nil {
			return nil, nil, m.keyErr(false, "%s signs with an RSA key; %T has %s", m.alg, s, describe(pub))
		}
		if k.N.BitLen() < MinRSABits {
			return nil, nil, m.keyErr(true, "%s needs an RSA key of at least %d bits (RFC 7518); %T has %s", m.alg, MinRSABits, s, describe(pub))
		}
	case familyEd25519:
		k, ok := pub.(ed25519.PublicKey)
		if !ok {
			return nil, nil, m.keyErr(false, "%s signs with an Ed25519 key; %T has %s", m.alg, s, describe(pub))
		}
		if len(k) != ed25519.PublicKeySize {
			return nil, nil, m.keyErr(true, "%s: %T has an Ed25519 public key of %d bytes, want %d", m.alg, s, len(k), ed25519.PublicKeySize)
		}
	}
	return s, pub, nil
}

// keyErr returns an error matching jwt.ErrInvalidKeyType and, when
// invalid is true (right type, wrong curve or size), jwt.ErrInvalidKey.
func (m *SigningMethod) keyErr(invalid bool, format string, args ...any) error {
	msg := fmt.Sprintf(format, args...)
	if invalid {
		return fmt.Errorf("hsmjwt: %s: %w (%w): %s", m.alg, jwt.ErrInvalidKeyType, jwt.ErrInvalidKey, msg)
	}
	return fmt.Errorf("hsmjwt: %s: %w: %s", m.alg, jwt.ErrInvalidKeyType, msg)
}

// publicOf returns s.Public(), refusing what would make it panic or lie: a
// typed nil signer, an ed25519.PrivateKey of the wrong length, a nil result.
// A panic inside Public itself (a zero-value key struct, for instance) is
// turned into an error: Public is a getter, and a key it cannot describe is
// a key that cannot be used.
func publicOf(s crypto.Signer) (pub crypto.PublicKey, err error) {
	if v := reflect.ValueOf(s); isNil(v) {
		return nil, fmt.Errorf("the key is a nil %T", s)
	}
	if k, ok := s.(ed25519.PrivateKey); ok && len(k) != ed25519.PrivateKeySize {
		return nil, fmt.Errorf("the ed25519.PrivateKey is %d bytes, want %d", len(k), ed25519.PrivateKeySize)
	}
	defer func() {
		if r := recover(); r != nil {
			pub, err = nil, fmt.Errorf("%T.Public panicked: %v", s, r)
		}
	}()
	pub = s.Public()
	if pub == nil || isNil(reflect.ValueOf(pub)) {
		return nil, fmt.Errorf("%T.Public returned no public key (%T)", s, pub)
	}
	return pub, nil
}

func isNil(v reflect.Value) bool {
	switch v.Kind() {
	case reflect.Invalid:
		return true
	case reflect.Pointer, reflect.Map, reflect.Slice, reflect.Func, reflect.Chan, reflect.Interface:
		return v.IsNil()
	}
	return false
}

func sameCurve(c, want elliptic.Curve) bool {
	if c == nil {
		return false
	}
	if c == want {
		return true
	}
	p := c.Params()
	return p != nil && p.Name == want.Params().Name && p.BitSize == want.Params().BitSize
}

// describe names a public key for an error message, e.g. "an ECDSA P-384 key".
func describe(pub crypto.PublicKey) string {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k == nil || k.Curve == nil || k.Curve.Params() == nil {
			return "an ECDSA key without a curve"
		}
		return "an ECDSA " + k.Curve.Params().Name + " key"
	case *rsa.PublicKey:
		if k == nil || k.N == nil {
			return "an RSA key without a modulus"
		}
		return fmt.Sprintf("an RSA-%d key", k.N.BitLen())
	case ed25519.PublicKey:
		return "an Ed25519 key"
	}
	return fmt.Sprintf("a public key of type %T", pub)
}

// fixedSize converts an ASN.1 DER ECDSA signature (crypto.Signer's output)
// into JWS's r||s, each zero-padded to the curve's size.
func fixedSize(der []byte, curve elliptic.Curve) ([]byte, error) {
	var rs struct{ R, S *big.Int }
	rest, err := asn1.Unmarshal(der, &rs)
	if err != nil {
		return nil, fmt.Errorf("a malformed ECDSA signature: %w", err)
	}
	if len(rest) != 0 {
		return nil, errors.New("a malformed ECDSA signature: trailing data after the ASN.1 sequence")
	}
	n := curve.Params().N
	if rs.R.Sign() <= 0 || rs.S.Sign() <= 0 || rs.R.Cmp(n) >= 0 || rs.S.Cmp(n) >= 0 {
		return nil, errors.New("an ECDSA signature with r or s out of range")
	}
	size := (curve.Params().BitSize + 7) / 8
	out := make([]byte, 2*size)
	rs.R.FillBytes(out[:size])
	rs.S.FillBytes(out[size:])
	return out, nil
}

// Verify verifies sig over signingString with golang-jwt's standard method
// of the same name (jwt.SigningMethodES256 for ES256, ...), so it accepts
// exactly what jwt.Parse accepts: *ecdsa.PublicKey, *rsa.PublicKey,
// ed25519.PublicKey. As a convenience, key may also be a crypto.Signer (an
// HSM key, a private key), whose public key is used. It makes no call to
// the signer other than Public, and is safe for concurrent use.
func (m *SigningMethod) Verify(signingString string, sig []byte, key any) error {
	if m == nil || m.std == nil {
		return errZeroMethod
	}
	if s, ok := key.(crypto.Signer); ok {
		pub, err := publicOf(s)
		if err != nil {
			return m.keyErr(false, "%v", err)
		}
		key = pub
	}
	return m.std.Verify(signingString, sig, key)
}

// SignedString is token.SignedString(key) with a context (see
// SignContext), and with the method of this package for the token's
// algorithm, whatever token.Method is: a token returned by jwt.Parse carries
// golang-jwt's standard method, which cannot sign with an HSM key. It
// fails for an algorithm this package does not sign (HS256, none).
func SignedString(ctx context.Context, token *jwt.Token, key crypto.Signer) (string, error) {
	if token == nil || token.Method == nil {
		return "", errors.New("hsmjwt: SignedString: the token has no signing method")
	}
	alg := token.Method.Alg()
	var m *SigningMethod
	for _, c := range methods {
		if c.alg == alg {
			m = c
			break
		}
	}
	if m == nil {
		return "", fmt.Errorf("hsmjwt: SignedString: algorithm %q is not one this package signs with a crypto.Signer", alg)
	}
	if h, ok := token.Header["alg"]; ok && h != alg {
		return "", fmt.Errorf("hsmjwt: SignedString: the token's header says alg %v, its method is %s", h, alg)
	}
	s, err := token.SigningString()
	if err != nil {
		return "", fmt.Errorf("hsmjwt: SignedString: %w", err)
	}
	sig, err := m.SignContext(ctx, s, key)
	if err != nil {
		return "", err
	}
	return s + "." + token.EncodeSegment(sig), nil
}
