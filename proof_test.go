package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// The private-key swap: while the library is down, only the private key
// object under a reference is replaced by another key (same CKA_ID and
// CKA_LABEL); the public key object stays. A key whose public key comes
// from the public key object would look the same, and sign with the other
// key. Every kind of key must refuse it, and sign nothing with it.

// swapCase is a key type of the swap tests, with what it signs.
type swapCase struct {
	typ    softhsmtest.KeyType
	opts   crypto.SignerOpts
	digest []byte
}

func swapCases() []swapCase {
	return []swapCase{
		{softhsmtest.P256, crypto.SHA256, hashOf(crypto.SHA256, []byte("swap"))},
		{softhsmtest.Ed25519, crypto.Hash(0), []byte("swap")},
		{softhsmtest.RSA2048, crypto.SHA256, hashOf(crypto.SHA256, []byte("swap"))},
	}
}

// swapSigners are the signers a swap test holds: a durable key, the
// PrivateKey of a TLSCertificate and, for RSA, a durable decrypter.
func swapSigners(t *testing.T, p *Provider, ref KeyRef) map[string]crypto.Signer {
	t.Helper()
	ds, err := p.DurableSigner(ref)
	if err != nil {
		t.Fatal(err)
	}
	tc, err := p.TLSCertificate(ref, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certFor(t, ds.Public())}))
	if err != nil {
		t.Fatal(err)
	}
	signers := map[string]crypto.Signer{"DurableSigner": ds, "TLSCertificate": tc.PrivateKey.(crypto.Signer)}
	if _, ok := ds.Public().(*rsa.PublicKey); ok {
		dd, err := p.DurableDecrypter(ref)
		if err != nil {
			t.Fatal(err)
		}
		signers["DurableDecrypter"] = dd
	}
	return signers
}

// refusesSwapped checks that each signer refuses, n times, to sign after
// the swap: no signature, and ErrKeyChanged (or, for a key the module
// cannot sign with at all, its refusal), without a lookup per call.
func refusesSwapped(t *testing.T, p *Provider, signers map[string]crypto.Signer, c swapCase, n int) {
	t.Helper()
	for name, s := range signers {
		ops := uint64(0)
		for i := range n {
			sig, err := s.Sign(nil, c.digest, c.opts)
			if sig != nil || err == nil {
				if verify(s.Public(), c.digest, sig, c.opts) != nil {
					t.Fatalf("%s: signature %d made with the swapped key, and it does not verify under Public()", name, i)
				}
				t.Fatalf("%s: signature %d made after the private key was swapped", name, i)
			}
			if !errors.Is(err, ErrKeyChanged) {
				if code, _ := codeOf(err); c.typ == softhsmtest.Ed25519 && classify(code) == classCaller {
					continue // the module cannot sign Ed25519 at all (p11-kit's RPC has no CKM_EDDSA)
				}
				t.Fatalf("%s: %v, want ErrKeyChanged", name, err)
			}
			if i == 0 {
				t.Logf("%s: %v", name, err)
				ops = p.Stats().Operations
			} else if p.Stats().Operations != ops {
				t.Fatalf("%s: the refusal made PKCS#11 operations again", name)
			}
		}
	}
}

// lookupAfterSwap: a new lookup of the swapped reference refuses the
// mismatched pair (EC, Ed25519: the public key object says another key),
// or, for RSA, whose public key is the private key object's own, finds
// the new key and signs under its own Public().
func lookupAfterSwap(t *testing.T, p *Provider, ref KeyRef, c swapCase, old crypto.PublicKey) {
	t.Helper()
	s, err := p.Signer(ref)
	if c.typ != softhsmtest.RSA2048 {
		if err == nil && c.typ == softhsmtest.Ed25519 {
			// A module that cannot sign Ed25519 cannot prove it either;
			// then it signs nothing.
			if _, serr := s.Sign(nil, c.digest, c.opts); serr == nil {
				t.Fatal("Ed25519 key found and signing after the swap without a proof")
			}
			return
		}
		e := wantErr(t, err, ErrKeyMismatch)
		t.Logf("lookup after the swap: %v", e)
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if samePublic(s.Public(), old) {
		t.Fatal("the RSA lookup still says the old public key")
	}
	sig, err := s.Sign(nil, c.digest, c.opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(s.Public(), c.digest, sig, c.opts); err != nil {
		t.Fatalf("the new RSA key's signature does not verify under its Public(): %v", err)
	}
}

// TestPrivateKeySwapped swaps the private key in process, while the library
// is finalized (inside Reinitialize), for EC, Ed25519 and RSA keys.
func TestPrivateKeySwapped(t *testing.T) {
	for _, c := range swapCases() {
		t.Run(string(c.typ), func(t *testing.T) {
			tok := softhsmtest.NewToken(t, "swap")
			ref := KeyRef{ID: []byte{9}, Label: "k"}
			tok.GenerateKey(t, c.typ, ref.ID, ref.Label)
			p := openToken(t, tok)
			signers := swapSigners(t, p, ref)
			for name, s := range signers {
				sig, err := s.Sign(nil, c.digest, c.opts)
				if err != nil {
					t.Fatalf("%s before the swap: %v", name, err)
				}
				if err := verify(s.Public(), c.digest, sig, c.opts); err != nil {
					t.Fatalf("%s before the swap: %v", name, err)
				}
			}
			p.testHookFinalized = func() {
				if err := tok.ReplacePrivate(c.typ, ref.ID, ref.Label); err != nil {
					t.Error(err)
				}
			}
			if err := p.Reinitialize(t.Context()); err != nil {
				t.Fatal(err)
			}
			p.testHookFinalized = nil
			refusesSwapped(t, p, signers, c, 100)
			lookupAfterSwap(t, p, ref, c, signers["DurableSigner"].Public())
		})
	}
}

// TestPrivateKeySwappedThroughRemoting: the same through p11-kit, the
// token's server killed, the private key swapped while it is down, the
// server restarted and the provider re-initialized.
func TestPrivateKeySwappedThroughRemoting(t *testing.T) {
	for _, c := range swapCases() {
		t.Run(string(c.typ), func(t *testing.T) {
			tok := softhsmtest.NewToken(t, "swapremote")
			ref := KeyRef{ID: []byte{9}, Label: "k"}
			tok.GenerateKey(t, c.typ, ref.ID, ref.Label)
			srv := softhsmtest.StartServer(t, tok)
			p := openToken(t, tok, func(cfg *Config) {
				cfg.Path = srv.Module()
				cfg.MaxSessions = 1
				cfg.DisableAutoRecovery = true
			})
			signers := swapSigners(t, p, ref)
			for name, s := range signers {
				sig, err := s.Sign(nil, c.digest, c.opts)
				if c.typ == softhsmtest.Ed25519 {
					// p11-kit 0.24's RPC does not carry CKM_EDDSA: the key
					// signs nothing through it, before or after.
					if err == nil {
						t.Logf("%s: this p11-kit carries CKM_EDDSA", name)
					}
					continue
				}
				if err != nil {
					t.Fatalf("%s before the swap: %v", name, err)
				}
				if err := verify(s.Public(), c.digest, sig, c.opts); err != nil {
					t.Fatalf("%s before the swap: %v", name, err)
				}
			}
			if err := srv.Kill(); err != nil {
				t.Fatal(err)
			}
			if err := tok.ReplacePrivate(c.typ, ref.ID, ref.Label); err != nil {
				t.Fatal(err)
			}
			if err := srv.Restart(); err != nil {
				t.Fatal(err)
			}
			if err := p.Reinitialize(t.Context()); err != nil {
				t.Fatal(err)
			}
			refusesSwapped(t, p, signers, c, 200)
			lookupAfterSwap(t, p, ref, c, signers["DurableSigner"].Public())
		})
	}
}

// certFor is a certificate for pub, issued by a throw-away CA in Go.
func certFor(t *testing.T, pub crypto.PublicKey) []byte {
	t.Helper()
	ca, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "hsm.test"},
		DNSNames:     []string{"hsm.test"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, ca)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// lyingRSA is the PKCS #8 DER of an RSA private key whose modulus and
// public exponent are pub's and whose private parts are priv's: an object
// whose CKA_MODULUS says one key while it signs with another.
func lyingRSA(t *testing.T, pub *rsa.PublicKey, priv *rsa.PrivateKey) []byte {
	t.Helper()
	priv.Precompute()
	type pkcs1 struct {
		Version               int
		N                     *big.Int
		E                     int
		D, P, Q, Dp, Dq, Qinv *big.Int
	}
	inner, err := asn1.Marshal(pkcs1{0, pub.N, pub.E, priv.D, priv.Primes[0], priv.Primes[1], priv.Precomputed.Dp, priv.Precomputed.Dq, priv.Precomputed.Qinv})
	if err != nil {
		t.Fatal(err)
	}
	der, err := asn1.Marshal(struct {
		Version int
		Algo    pkix.AlgorithmIdentifier
		Key     []byte
	}{0, pkix.AlgorithmIdentifier{Algorithm: asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 1}, Parameters: asn1.NullRawValue}, inner})
	if err != nil {
		t.Fatal(err)
	}
	return der
}

// TestRSAPrivateObjectLies: an RSA private key object whose CKA_MODULUS
// is the pinned key's but whose private parts are another key's replaces
// the pinned one while the library is down. The public key read from it
// is the pinned one; only the proof shows that it does not sign for it.
// The durable key, and a TLS certificate's, refuse it with ErrKeyChanged.
func TestRSAPrivateObjectLies(t *testing.T) {
	tok := softhsmtest.NewToken(t, "rsalies")
	ref := KeyRef{ID: []byte{9}, Label: "k"}
	tok.GenerateKey(t, softhsmtest.RSA2048, ref.ID, ref.Label)
	p := openToken(t, tok)
	c := swapCase{softhsmtest.RSA2048, crypto.SHA256, hashOf(crypto.SHA256, []byte("lies"))}
	signers := swapSigners(t, p, ref)
	other, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	f := t.TempDir() + "/lying.der"
	if err := os.WriteFile(f, lyingRSA(t, signers["DurableSigner"].Public().(*rsa.PublicKey), other), 0o600); err != nil {
		t.Fatal(err)
	}
	p.testHookFinalized = func() {
		if _, err := tok.Tool("--delete-object", "--type", "privkey", "--id", "09"); err != nil {
			t.Error(err)
		}
		if _, err := tok.Tool("--write-object", f, "--type", "privkey", "--id", "09", "--label", "k"); err != nil {
			t.Error(err)
		}
	}
	if err := p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	p.testHookFinalized = nil
	// What the token now says of the key is the pinned public key.
	s, err := p.Signer(ref)
	if err != nil {
		t.Fatal(err)
	}
	if !samePublic(s.Public(), signers["DurableSigner"].Public()) {
		t.Fatal("the lying object does not show the pinned modulus: the test proves nothing")
	}
	refusesSwapped(t, p, signers, c, 20)
}

// BenchmarkProof measures what the proof of possession costs, per key
// type, on the shared SoftHSM token: a signature alone (sign), the proof
// alone (one signature of a challenge and its verification in Go), a
// lookup (which proves EC and Ed25519 keys), and a durable key's first
// signature after a re-initialization (a lookup, a proof for every key
// type, and the signature). Run: go test -run '^$' -bench Proof -benchtime 200x .
func BenchmarkProof(b *testing.B) {
	p := openShared(b)
	for _, label := range []string{"p256", "p384", "ed25519", "rsa2048", "rsa3072"} {
		s := mustSigner(b, p, label)
		digest, opts := signInput(s, []byte("proof"))
		b.Run("sign/"+label, func(b *testing.B) {
			for b.Loop() {
				if _, err := s.Sign(nil, digest, opts); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("proof/"+label, func(b *testing.B) {
			for b.Loop() {
				if res, err := s.k.prove(s.k.pub); err != nil || res != provedMatch {
					b.Fatal(res, err)
				}
			}
		})
		b.Run("lookup/"+label, func(b *testing.B) {
			for b.Loop() {
				if _, err := p.Signer(KeyRef{Label: label}); err != nil {
					b.Fatal(err)
				}
			}
		})
		ds, err := p.DurableSigner(KeyRef{Label: label})
		if err != nil {
			b.Fatal(err)
		}
		b.Run("rebind/"+label, func(b *testing.B) {
			for range b.N {
				b.StopTimer()
				if err := p.Reinitialize(context.Background()); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if _, err := ds.Sign(nil, digest, opts); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
