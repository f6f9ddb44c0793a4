package hsm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	_ "crypto/sha3"
	"crypto/x509"
	"encoding/asn1"
	"math/big"
	"testing"
)

func TestSignVerify(t *testing.T) { forEachPath(t, testSignVerify) }

func testSignVerify(t *testing.T, p *Provider) {
	msg := []byte("the quick brown fox jumps over the lazy dog")
	pssAuto := &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto, Hash: crypto.SHA256}
	tests := []struct {
		key  string
		opts crypto.SignerOpts
	}{
		{"rsa2048", crypto.SHA1},
		{"rsa2048", crypto.SHA224},
		{"rsa2048", crypto.SHA256},
		{"rsa2048", crypto.SHA384},
		{"rsa2048", crypto.SHA512},
		{"rsa2048", crypto.SHA3_256},
		{"rsa3072", crypto.SHA512},
		{"rsa2048", pssAuto},
		{"rsa2048", &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}},
		{"rsa2048", &rsa.PSSOptions{SaltLength: 20, Hash: crypto.SHA384}},
		{"rsa2048", &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto, Hash: crypto.SHA512}},
		{"rsa2048", &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA1}},
		{"rsa2048", &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA224}},
		{"rsa3072", &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA512}},
		{"p256", crypto.SHA256},
		{"p256", crypto.SHA384}, // longer than the order: truncated as ecdsa.SignASN1 does
		{"p256", crypto.SHA512},
		{"p256", crypto.SHA1},
		{"p384", crypto.SHA384},
		{"p384", crypto.SHA512},
		{"p521", crypto.SHA512},
		{"p521", crypto.SHA256},
		{"ed25519", crypto.Hash(0)},
		{"ed25519", &ed25519.Options{}},
	}
	for _, tt := range tests {
		name := tt.key + "/" + optsName(tt.opts)
		t.Run(name, func(t *testing.T) {
			s := mustSigner(t, p, tt.key)
			digest := hashOf(tt.opts.HashFunc(), msg)
			sig, err := s.Sign(nil, digest, tt.opts)
			if err != nil {
				t.Fatalf("Sign: %v", err)
			}
			if err := verify(s.Public(), digest, sig, tt.opts); err != nil {
				t.Fatalf("verify: %v", err)
			}
			// A signature over other data must not verify: the verifier
			// above is not vacuous.
			other := hashOf(tt.opts.HashFunc(), []byte("other"))
			if verify(s.Public(), other, sig, tt.opts) == nil {
				t.Fatal("signature verifies over other data")
			}
		})
	}
}

func optsName(o crypto.SignerOpts) string {
	switch o := o.(type) {
	case *rsa.PSSOptions:
		return "PSS-" + o.Hash.String() + "-salt" + big.NewInt(int64(o.SaltLength)).String()
	case *ed25519.Options:
		return "ed25519.Options"
	}
	if o.HashFunc() == 0 {
		return "Hash(0)"
	}
	return o.HashFunc().String()
}

// TestSignPKCS1Raw signs pre-formatted input with crypto.Hash(0), as
// rsa.SignPKCS1v15 allows (TLS 1.0 MD5+SHA1, custom DigestInfo).
func TestSignPKCS1Raw(t *testing.T) {
	p := openShared(t)
	s := mustSigner(t, p, "rsa2048")
	d := sha256.Sum256([]byte("raw"))
	// The DigestInfo for SHA-256 followed by the digest: verifying it as a
	// SHA-256 PKCS #1 v1.5 signature proves the token signed it as given.
	input := append(append([]byte(nil), pkcs1Prefix[crypto.SHA256]...), d[:]...)
	sig, err := s.Sign(nil, input, crypto.Hash(0))
	if err != nil {
		t.Fatal(err)
	}
	if err := rsa.VerifyPKCS1v15(s.Public().(*rsa.PublicKey), crypto.Hash(0), input, sig); err != nil {
		t.Fatal(err)
	}
	if err := rsa.VerifyPKCS1v15(s.Public().(*rsa.PublicKey), crypto.SHA256, d[:], sig); err != nil {
		t.Fatal(err)
	}
}

// TestECDSAFormat checks the encoding is ASN.1 DER exactly as crypto/ecdsa
// writes it: a SEQUENCE of two minimal INTEGERs, nothing trailing.
func TestECDSAFormat(t *testing.T) {
	p := openShared(t)
	for _, name := range []string{"p256", "p384", "p521"} {
		s := mustSigner(t, p, name)
		for i := range 20 {
			d := sha256.Sum256([]byte{byte(i)})
			sig, err := s.Sign(nil, d[:], crypto.SHA256)
			if err != nil {
				t.Fatal(err)
			}
			var rs struct{ R, S *big.Int }
			rest, err := asn1.Unmarshal(sig, &rs)
			if err != nil || len(rest) != 0 {
				t.Fatalf("%s: not a single DER SEQUENCE: %v, %d trailing bytes", name, err, len(rest))
			}
			again, _ := asn1.Marshal(rs)
			if string(again) != string(sig) {
				t.Fatalf("%s: not canonical DER", name)
			}
			if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), d[:], sig) {
				t.Fatalf("%s: does not verify", name)
			}
		}
	}
}

func TestPublicKeys(t *testing.T) {
	p := openShared(t)
	tests := []struct {
		label string
		check func(crypto.PublicKey) bool
	}{
		{"rsa2048", func(k crypto.PublicKey) bool {
			r, ok := k.(*rsa.PublicKey)
			return ok && r.N.BitLen() == 2048 && r.E == 65537
		}},
		{"rsa3072", func(k crypto.PublicKey) bool { r, ok := k.(*rsa.PublicKey); return ok && r.N.BitLen() == 3072 }},
		{"p256", func(k crypto.PublicKey) bool {
			e, ok := k.(*ecdsa.PublicKey)
			return ok && e.Curve.Params().Name == "P-256"
		}},
		{"p384", func(k crypto.PublicKey) bool {
			e, ok := k.(*ecdsa.PublicKey)
			return ok && e.Curve.Params().Name == "P-384"
		}},
		{"p521", func(k crypto.PublicKey) bool {
			e, ok := k.(*ecdsa.PublicKey)
			return ok && e.Curve.Params().Name == "P-521"
		}},
		{"ed25519", func(k crypto.PublicKey) bool { e, ok := k.(ed25519.PublicKey); return ok && len(e) == 32 }},
	}
	for _, tt := range tests {
		s := mustSigner(t, p, tt.label)
		if !tt.check(s.Public()) {
			t.Errorf("%s: Public() = %T %v", tt.label, s.Public(), s.Public())
		}
		// Every public key must marshal as the standard library's types do.
		if _, err := x509.MarshalPKIXPublicKey(s.Public()); err != nil {
			t.Errorf("%s: MarshalPKIXPublicKey: %v", tt.label, err)
		}
	}
}

func TestSignBadInput(t *testing.T) {
	p := openShared(t)
	d := sha256.Sum256([]byte("x"))
	tests := []struct {
		name, key string
		digest    []byte
		opts      crypto.SignerOpts
	}{
		{"nil opts RSA", "rsa2048", d[:], nil},
		{"nil opts ECDSA", "p256", d[:], nil},
		{"nil opts Ed25519", "ed25519", []byte("m"), nil},
		{"short digest RSA", "rsa2048", d[:31], crypto.SHA256},
		{"long digest RSA", "rsa2048", append(d[:], 0), crypto.SHA256},
		{"wrong digest ECDSA", "p256", d[:20], crypto.SHA256},
		{"empty digest ECDSA", "p256", nil, crypto.Hash(0)},
		{"wrong digest PSS", "rsa2048", d[:20], &rsa.PSSOptions{Hash: crypto.SHA256}},
		{"unsupported hash PKCS1", "rsa2048", make([]byte, 16), crypto.MD4},
		{"unsupported hash PSS", "rsa2048", make([]byte, 32), &rsa.PSSOptions{Hash: crypto.SHA3_256}},
		{"PSS without hash", "rsa2048", d[:], &rsa.PSSOptions{}},
		{"PSS salt too long", "rsa2048", d[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 223}},
		{"PSS salt invalid", "rsa2048", d[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: -7}},
		{"Ed25519 with a hash", "ed25519", d[:], crypto.SHA256},
		{"Ed25519ph", "ed25519", make([]byte, 64), &ed25519.Options{Hash: crypto.SHA512}},
		{"Ed25519ctx", "ed25519", []byte("m"), &ed25519.Options{Context: "ctx"}},
		{"raw input too long", "rsa2048", make([]byte, 246), crypto.Hash(0)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := mustSigner(t, p, tt.key)
			sig, err := s.Sign(nil, tt.digest, tt.opts)
			if sig != nil {
				t.Errorf("signature returned with error")
			}
			e := wantErr(t, err, ErrInvalidOptions)
			if e.Op != "sign" || e.Generation != 1 || e.Code != 0 {
				t.Errorf("error fields = %+v", e)
			}
			t.Log(err)
		})
	}
	// The largest salt that fits is accepted and verifies: the bound above
	// is exact, not conservative.
	s := mustSigner(t, p, "rsa2048")
	// An empty input with crypto.Hash(0) is signed, as rsa.SignPKCS1v15
	// does.
	empty, err := s.Sign(nil, nil, crypto.Hash(0))
	if err != nil {
		t.Fatalf("empty input: %v", err)
	}
	if err := rsa.VerifyPKCS1v15(s.Public().(*rsa.PublicKey), 0, nil, empty); err != nil {
		t.Fatalf("empty input: %v", err)
	}
	opts := &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 222}
	sig, err := s.Sign(nil, d[:], opts)
	if err != nil {
		t.Fatalf("max salt: %v", err)
	}
	if err := rsa.VerifyPSS(s.Public().(*rsa.PublicKey), crypto.SHA256, d[:], sig, opts); err != nil {
		t.Fatal(err)
	}
}

// TestDERSignature checks the hand-written encoder against encoding/asn1
// on the edge cases: high bit set (padding), leading zeros, long-form
// sequence length (P-521), zero components.
func TestDERSignature(t *testing.T) {
	full := func(b byte, n int) []byte { return bytes.Repeat([]byte{b}, n) }
	cases := []struct{ r, s []byte }{
		{full(0x7f, 32), full(0x01, 32)},
		{full(0x80, 32), full(0xff, 32)},
		{append([]byte{0, 0, 0x80}, full(1, 29)...), append([]byte{0}, full(0x7f, 31)...)},
		{append([]byte{0x01}, full(0xff, 65)...), append([]byte{0x01}, full(0x80, 65)...)}, // P-521
		{full(0xff, 66), full(0xff, 66)},
		{[]byte{0, 0, 1}, []byte{0, 2}},
	}
	for _, c := range cases {
		got := derSignature(c.r, c.s)
		want, err := asn1.Marshal(struct{ R, S *big.Int }{new(big.Int).SetBytes(c.r), new(big.Int).SetBytes(c.s)})
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("r=%x s=%x:\n got %x\nwant %x", c.r, c.s, got, want)
		}
	}
	if derSignature([]byte{0, 0}, []byte{1}) != nil || derSignature([]byte{1}, nil) != nil {
		t.Error("a zero component must not encode")
	}
}
