package hsm

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"math/big"
	"testing"
)

// rawDecrypt is textbook RSA with a software key: what CKM_RSA_X_509 returns.
func rawDecrypt(priv *rsa.PrivateKey, ct []byte) []byte {
	c := new(big.Int).SetBytes(ct)
	m := new(big.Int).Exp(c, priv.D, priv.N)
	return m.FillBytes(make([]byte, priv.Size()))
}

func TestUnpadOAEP(t *testing.T) {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range []crypto.Hash{crypto.SHA1, crypto.SHA224, crypto.SHA256, crypto.SHA384, crypto.SHA512} {
		for _, mgf := range []crypto.Hash{0, crypto.SHA1, crypto.SHA512} {
			for _, label := range [][]byte{nil, []byte("label")} {
				for _, n := range []int{0, 1, 32, priv.Size() - 2*h.Size() - 2} {
					msg := make([]byte, n)
					rand.Read(msg)
					o := &rsa.OAEPOptions{Hash: h, MGFHash: mgf, Label: label}
					ct, err := rsa.EncryptOAEPWithOptions(rand.Reader, &priv.PublicKey, msg, o)
					if err != nil {
						t.Fatal(err)
					}
					m := mgf
					if m == 0 {
						m = h
					}
					got, ok := unpadOAEP(rawDecrypt(priv, ct), h, m, label)
					if !ok || !bytes.Equal(got, msg) {
						t.Fatalf("%v/%v label %q len %d: got %x, %v", h, m, label, n, got, ok)
					}
					// Any other label, or a flipped bit, must fail.
					if _, ok := unpadOAEP(rawDecrypt(priv, ct), h, m, []byte("other")); ok {
						t.Fatalf("%v: wrong label accepted", h)
					}
					bad := rawDecrypt(priv, ct)
					bad[len(bad)-1] ^= 1
					if got, ok := unpadOAEP(bad, h, m, label); ok && bytes.Equal(got, msg) {
						t.Fatalf("%v: corrupted message decoded to the original", h)
					}
				}
			}
		}
	}
}

func FuzzUnpadOAEP(f *testing.F) {
	f.Add(make([]byte, 256), []byte(nil))
	f.Add(append([]byte{0}, bytes.Repeat([]byte{1}, 255)...), []byte("l"))
	f.Add([]byte{0, 1, 2}, []byte(nil))
	f.Fuzz(func(t *testing.T, em, label []byte) {
		for _, h := range []crypto.Hash{crypto.SHA1, crypto.SHA256} {
			in := bytes.Clone(em)
			msg, ok := unpadOAEP(in, h, h, label)
			if !ok && msg != nil {
				t.Fatal("message returned with failure")
			}
			if ok && len(msg) > len(em)-2*h.Size()-2 {
				t.Fatalf("message of %d bytes from a %d-byte block", len(msg), len(em))
			}
		}
	})
}

// TestOAEPSHA512t: OAEP with SHA-512/224 and SHA-512/256 (as the hash, the
// MGF1 hash or both), which PKCS#11 has no OAEP parameters for, decrypts on
// the token's raw RSA with the padding decoded here, labels included; a
// token that refuses raw RSA refuses them clearly, without a call.
func TestOAEPSHA512t(t *testing.T) {
	p := openShared(t)
	d, err := p.Decrypter(KeyRef{Label: "rsa2048"})
	if err != nil {
		t.Fatal(err)
	}
	pub := d.Public().(*rsa.PublicKey)
	for _, h := range []crypto.Hash{crypto.SHA512_224, crypto.SHA512_256, crypto.SHA256} {
		for _, mgf := range []crypto.Hash{0, crypto.SHA1, crypto.SHA512_224, crypto.SHA512_256} {
			if h == crypto.SHA256 && (mgf == 0 || mgf == crypto.SHA1) {
				continue // the token's own parameters: tested elsewhere
			}
			for _, label := range [][]byte{nil, []byte("label")} {
				o := &rsa.OAEPOptions{Hash: h, MGFHash: mgf, Label: label}
				msg := []byte("SHA-512/t " + h.String())
				ct, err := rsa.EncryptOAEPWithOptions(rand.Reader, pub, msg, o)
				if err != nil {
					t.Fatal(err)
				}
				got, err := d.Decrypt(nil, ct, o)
				if err != nil || !bytes.Equal(got, msg) {
					t.Fatalf("%v/MGF1-%v label %q: %q, %v", h, mgf, label, got, err)
				}
				wrong := *o
				wrong.Label = []byte("other")
				_, err = d.Decrypt(nil, ct, &wrong)
				wantErr(t, err, ErrDecryption)
			}
		}
	}
	// A hash crypto/rsa has and PKCS#11 OAEP has not, other than those.
	_, err = d.Decrypt(nil, make([]byte, 256), &rsa.OAEPOptions{Hash: crypto.SHA3_256})
	wantErr(t, err, ErrInvalidOptions)

	// A token that refuses raw RSA (remembered for the generation, as
	// decryptions learn it) cannot decode these: a clear refusal.
	d.k.in.rawRefused.Store(true)
	defer d.k.in.rawRefused.Store(false)
	ct, err := rsa.EncryptOAEPWithOptions(rand.Reader, pub, []byte("x"), &rsa.OAEPOptions{Hash: crypto.SHA512_256})
	if err != nil {
		t.Fatal(err)
	}
	ops := p.Stats().Operations
	_, err = d.Decrypt(nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA512_256})
	e := wantErr(t, err, ErrInvalidOptions)
	t.Log(e)
	if p.Stats().Operations != ops {
		t.Fatal("the refusal made a PKCS#11 operation")
	}
}
