//lint:file-ignore SA1019 PKCS #1 v1.5 decryption is part of crypto.Decrypter; these tests need v1.5 ciphertexts.

package hsm

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"fmt"
	"testing"
)

func TestDecrypt(t *testing.T) { forEachPath(t, testDecrypt) }

func testDecrypt(t *testing.T, p *Provider) {
	d, err := p.Decrypter(KeyRef{Label: "rsa2048"})
	if err != nil {
		t.Fatal(err)
	}
	pub := d.Public().(*rsa.PublicKey)
	secret := []byte("attack at dawn")
	oaep := []struct {
		hash, mgf crypto.Hash
		label     []byte
	}{
		{crypto.SHA1, 0, nil},
		{crypto.SHA1, 0, []byte("SoftHSM 2.6 ignores this label")},
		{crypto.SHA256, 0, nil},
		{crypto.SHA256, 0, []byte("context label")},
		{crypto.SHA384, 0, nil},
		{crypto.SHA512, 0, []byte("l")},
		{crypto.SHA224, 0, nil},
	}
	for _, tt := range oaep {
		t.Run(fmt.Sprintf("OAEP-%v-label%d", tt.hash, len(tt.label)), func(t *testing.T) {
			ct, err := rsa.EncryptOAEPWithOptions(rand.Reader, pub, secret, &rsa.OAEPOptions{Hash: tt.hash, MGFHash: tt.mgf, Label: tt.label})
			if err != nil {
				t.Fatal(err)
			}
			pt, err := d.Decrypt(nil, ct, &rsa.OAEPOptions{Hash: tt.hash, MGFHash: tt.mgf, Label: tt.label})
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(pt, secret) {
				t.Fatalf("plaintext %q, want %q", pt, secret)
			}
		})
	}
	t.Run("OAEP path", func(t *testing.T) {
		// SoftHSM 2.6 does SHA-1 OAEP without a label itself, and refuses
		// other hashes, which then go through CKM_RSA_X_509 and the
		// software decoding, as every labelled OAEP does. Both must have
		// been exercised above.
		in := p.inst.Load()
		if _, soft := in.oaepSoft.Load(oaepShape{crypto.SHA1, crypto.SHA1, false}); soft {
			t.Error("SHA-1 OAEP without label went to the software path; the token supports it")
		}
		if _, soft := in.oaepSoft.Load(oaepShape{crypto.SHA256, crypto.SHA256, false}); !soft {
			t.Error("SHA-256 OAEP did not go to the software path")
		}
	})
	t.Run("OAEP MGFHash differs", func(t *testing.T) {
		o := &rsa.OAEPOptions{Hash: crypto.SHA256, MGFHash: crypto.SHA1}
		ct, err := rsa.EncryptOAEPWithOptions(rand.Reader, pub, secret, o)
		if err != nil {
			t.Fatal(err)
		}
		pt, err := d.Decrypt(nil, ct, o)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(pt, secret) {
			t.Fatalf("plaintext %q", pt)
		}
		// The MGF hash is really passed to the token: decrypting with
		// MGF1-SHA-256 instead must fail.
		if _, err := d.Decrypt(nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA256}); err == nil {
			t.Fatal("decryption with the wrong MGF hash succeeded")
		}
	})
	t.Run("PKCS1v15", func(t *testing.T) {
		ct, err := rsa.EncryptPKCS1v15(rand.Reader, pub, secret)
		if err != nil {
			t.Fatal(err)
		}
		for _, opts := range []crypto.DecrypterOpts{nil, &rsa.PKCS1v15DecryptOptions{}} {
			pt, err := d.Decrypt(nil, ct, opts)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(pt, secret) {
				t.Fatalf("plaintext %q", pt)
			}
		}
	})
	t.Run("PKCS1v15 session key", func(t *testing.T) {
		key := make([]byte, 48)
		rand.Read(key)
		ct, _ := rsa.EncryptPKCS1v15(rand.Reader, pub, key)
		opts := &rsa.PKCS1v15DecryptOptions{SessionKeyLen: 48}
		pt, err := d.Decrypt(nil, ct, opts)
		if err != nil || !bytes.Equal(pt, key) {
			t.Fatalf("good ciphertext: %x, %v", pt, err)
		}
		// A key of another length, and garbage: random 48 bytes, no error,
		// as rsa.DecryptPKCS1v15SessionKey.
		short, _ := rsa.EncryptPKCS1v15(rand.Reader, pub, key[:16])
		garbage := make([]byte, 256)
		garbage[0] = 0x01
		for name, ct := range map[string][]byte{"wrong length": short, "bad padding": garbage} {
			pt, err := d.Decrypt(nil, ct, opts)
			if err != nil || len(pt) != 48 || bytes.Equal(pt, key) {
				t.Fatalf("%s: %x, %v; want 48 random bytes and no error", name, pt, err)
			}
			pt2, _ := d.Decrypt(nil, ct, opts)
			if bytes.Equal(pt, pt2) {
				t.Fatalf("%s: the same bytes twice: not random", name)
			}
		}
	})
	t.Run("Decrypter signs too", func(t *testing.T) {
		h := sha256.Sum256([]byte("x"))
		sig, err := d.Sign(nil, h[:], crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, h[:], sig); err != nil {
			t.Fatal(err)
		}
	})
}

func TestDecryptBadInput(t *testing.T) { forEachPath(t, testDecryptBadInput) }

func testDecryptBadInput(t *testing.T, p *Provider) {
	d, err := p.Decrypter(KeyRef{Label: "rsa2048"})
	if err != nil {
		t.Fatal(err)
	}
	pub := d.Public().(*rsa.PublicKey)
	ct, _ := rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, []byte("s"), []byte("right"))

	t.Run("OAEP label mismatch", func(t *testing.T) {
		_, err := d.Decrypt(nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA256, Label: []byte("wrong")})
		wantErr(t, err, ErrDecryption)
		t.Log(err)
		// The session the failure happened on is still usable.
		if _, err := d.Decrypt(nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA256, Label: []byte("right")}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("OAEP label the token ignores", func(t *testing.T) {
		// SoftHSM 2.6's CKM_RSA_PKCS_OAEP with SHA-1 ignores the label: a
		// ciphertext made without one would decrypt under any label.
		ct, _ := rsa.EncryptOAEP(sha1.New(), rand.Reader, pub, []byte("s"), nil)
		_, err := d.Decrypt(nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA1, Label: []byte("not the label")})
		wantErr(t, err, ErrDecryption)
		ct, _ = rsa.EncryptOAEP(sha1.New(), rand.Reader, pub, []byte("s"), []byte("one"))
		_, err = d.Decrypt(nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA1, Label: []byte("another")})
		wantErr(t, err, ErrDecryption)
	})
	t.Run("OAEP hash mismatch", func(t *testing.T) {
		_, err := d.Decrypt(nil, ct, &rsa.OAEPOptions{Hash: crypto.SHA384, Label: []byte("right")})
		wantErr(t, err, ErrDecryption)
	})
	bad := []struct {
		name string
		ct   []byte
		opts crypto.DecrypterOpts
	}{
		{"short ciphertext", ct[:255], nil},
		{"long ciphertext", append(append([]byte(nil), ct...), 0), &rsa.OAEPOptions{Hash: crypto.SHA256}},
		{"empty ciphertext", nil, nil},
		{"unsupported OAEP hash", ct, &rsa.OAEPOptions{Hash: crypto.SHA3_256}},
		{"unsupported MGF hash", ct, &rsa.OAEPOptions{Hash: crypto.SHA256, MGFHash: crypto.MD5}},
		{"unknown options", ct, crypto.SHA256},
		{"session key too long", ct, &rsa.PKCS1v15DecryptOptions{SessionKeyLen: 250}},
	}
	for _, tt := range bad {
		t.Run(tt.name, func(t *testing.T) {
			pt, err := d.Decrypt(nil, tt.ct, tt.opts)
			if pt != nil {
				t.Error("plaintext returned with error")
			}
			wantErr(t, err, ErrInvalidOptions)
			t.Log(err)
		})
	}
	t.Run("EC key", func(t *testing.T) {
		_, err := p.Decrypter(KeyRef{Label: "p256"})
		wantErr(t, err, ErrUnsupportedKey)
		t.Log(err)
		_, err = p.Decrypter(KeyRef{Label: "ed25519"})
		wantErr(t, err, ErrUnsupportedKey)
	})
}
