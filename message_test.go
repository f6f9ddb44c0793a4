package hsm

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"strings"
	"testing"
)

// TestSignMessage: SignMessage of every type of key signs the message as
// Sign signs its digest (the same bytes where the scheme is deterministic:
// PKCS #1 v1.5, Ed25519), on both paths, and crypto.SignMessage calls it.
func TestSignMessage(t *testing.T) { forEachPath(t, testSignMessage) }

func testSignMessage(t *testing.T, p *Provider) {
	msg := []byte("the whole message, as crypto/x509 and crypto/tls hand it over")
	tests := []struct {
		key  string
		opts crypto.SignerOpts
	}{
		{"rsa2048", crypto.SHA256},
		{"rsa2048", crypto.SHA1},
		{"rsa2048", crypto.SHA512},
		{"rsa2048", crypto.SHA3_256},
		{"rsa3072", crypto.SHA384},
		{"rsa2048", &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}},
		{"rsa2048", &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto, Hash: crypto.SHA512}},
		{"p256", crypto.SHA256},
		{"p256", crypto.SHA512},
		{"p384", crypto.SHA384},
		{"p521", crypto.SHA512},
		{"ed25519", crypto.Hash(0)},
		{"ed25519", &ed25519.Options{}},
	}
	for _, tt := range tests {
		t.Run(tt.key+"/"+optsName(tt.opts), func(t *testing.T) {
			s := mustSigner(t, p, tt.key)
			digest := hashOf(tt.opts.HashFunc(), msg)
			sig, err := s.SignMessage(nil, msg, tt.opts)
			if err != nil {
				t.Fatalf("SignMessage: %v", err)
			}
			if err := verify(s.Public(), digest, sig, tt.opts); err != nil {
				t.Fatalf("verify: %v", err)
			}
			via, err := crypto.SignMessage(s, rand.Reader, msg, tt.opts)
			if err != nil {
				t.Fatalf("crypto.SignMessage: %v", err)
			}
			if err := verify(s.Public(), digest, via, tt.opts); err != nil {
				t.Fatalf("crypto.SignMessage: verify: %v", err)
			}
			_, pss := tt.opts.(*rsa.PSSOptions)
			if s.k.kind != kindECDSA && !pss {
				// Deterministic: the very signature Sign makes.
				want, err := s.Sign(nil, digest, tt.opts)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(sig, want) {
					t.Fatal("SignMessage's signature is not Sign's of the digest")
				}
			}
		})
	}
}

// TestSignMessageBadInput: bad options are refused with ErrInvalidOptions,
// without a PKCS#11 call and without a panic.
func TestSignMessageBadInput(t *testing.T) {
	p := openShared(t)
	msg := []byte("m")
	tests := []struct {
		name, key, want string
		opts            crypto.SignerOpts
	}{
		{"nil opts RSA", "rsa2048", "opts is nil", nil},
		{"nil opts Ed25519", "ed25519", "opts is nil", nil},
		{"nil PSS options", "rsa2048", "opts is a nil *rsa.PSSOptions", (*rsa.PSSOptions)(nil)},
		{"Hash(0) RSA", "rsa2048", "SignMessage hashes the message", crypto.Hash(0)},
		{"Hash(0) ECDSA", "p256", "SignMessage hashes the message", crypto.Hash(0)},
		{"PSS without hash", "rsa2048", "SignMessage hashes the message", &rsa.PSSOptions{}},
		{"hash out of range", "p256", "not supported", crypto.Hash(99)},
		{"PSS salt too long", "rsa2048", "too long", &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 223}},
		{"PSS unsupported hash", "rsa2048", "not supported for RSA-PSS", &rsa.PSSOptions{Hash: crypto.SHA3_256}},
		{"Ed25519 with a hash", "ed25519", "crypto.Hash(0)", crypto.SHA256},
		{"Ed25519ph", "ed25519", "Ed25519ph", &ed25519.Options{Hash: crypto.SHA512}},
		{"panicking HashFunc", "p256", "panicked", struct{ *rsa.PSSOptions }{}},
	}
	if !crypto.MD4.Available() {
		tests = append(tests, struct {
			name, key, want string
			opts            crypto.SignerOpts
		}{"hash not linked", "p256", "not linked", crypto.MD4})
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := mustSigner(t, p, tt.key)
			ops := p.Stats().Operations
			sig, err := s.SignMessage(nil, msg, tt.opts)
			if sig != nil {
				t.Error("a signature returned with the error")
			}
			e := wantErr(t, err, ErrInvalidOptions)
			if e.Op != "sign" || e.Code != 0 || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v (%+v), want one saying %q", err, e, tt.want)
			}
			if p.Stats().Operations != ops {
				t.Error("a refused SignMessage made a PKCS#11 operation")
			}
			t.Log(err)
		})
	}
}
