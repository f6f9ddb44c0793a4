package hsm

import (
	"crypto"
	"crypto/rsa"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

// TestAlwaysAuthenticate: a key with CKA_ALWAYS_AUTHENTICATE signs and
// decrypts: the provider logs in again (CKU_CONTEXT_SPECIFIC) before each
// operation, as the standard asks, on both paths.
func TestAlwaysAuthenticate(t *testing.T) {
	tok := softhsmtest.NewToken(t, "alwaysauth")
	for _, path := range []string{"two-call", "miekg"} {
		t.Run(path, func(t *testing.T) {
			p := openToken(t, tok)
			if path == "miekg" {
				p.fast = nil
			}
			label := "always-" + path
			s, err := p.GenerateKey(KeySpec{Type: RSA2048, Label: label, Decrypt: true,
				PrivateAttributes: []Attribute{{pkcs11.CKA_ALWAYS_AUTHENTICATE, true}}})
			if err != nil {
				t.Fatal(err)
			}
			if !s.k.alwaysAuth {
				t.Fatal("CKA_ALWAYS_AUTHENTICATE not read")
			}
			for i := range 3 {
				sig, err := s.Sign(nil, digest32[:], crypto.SHA256)
				if err != nil {
					t.Fatalf("signature %d: %v", i, err)
				}
				if err := verify(s.Public(), digest32[:], sig, crypto.SHA256); err != nil {
					t.Fatal(err)
				}
			}
			d, err := p.Decrypter(KeyRef{Label: label})
			if err != nil {
				t.Fatal(err)
			}
			for _, opts := range []crypto.DecrypterOpts{nil, &rsa.OAEPOptions{Hash: crypto.SHA256}} {
				ct := encryptTo(t, d.Public().(*rsa.PublicKey), []byte("again"), opts)
				if pt, err := d.Decrypt(nil, ct, opts); err != nil || string(pt) != "again" {
					t.Fatalf("decrypt %T: %q %v", opts, pt, err)
				}
			}
		})
	}
}

// TestUserType: the login's user type comes from Config.UserType; SoftHSM
// knows only CKU_USER, and refuses Thales's CKU_CRYPTO_USER by name.
func TestUserType(t *testing.T) {
	tok := sharedToken(t)
	p := openToken(t, tok, func(c *Config) { c.UserType = pkcs11.CKU_USER })
	mustSigner(t, p, "p256")
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	_, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN, UserType: 0x80000001})
	if code, _ := codeOf(err); code != pkcs11.CKR_USER_TYPE_INVALID {
		t.Fatalf("CKU_CRYPTO_USER on SoftHSM: %v, want CKR_USER_TYPE_INVALID", err)
	}
	t.Log(err)
}
