package stepkms

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"go.step.sm/crypto/kms/apiv1"
)

// TestPrivateKeySwapped: a step-ca signer of a network HSM (SoftHSM behind
// p11-kit) whose private key object alone is replaced while the HSM is
// down (same CKA_ID and CKA_LABEL, the public key object left as it was)
// refuses to sign after recovery, with hsm.ErrKeyChanged, and never signs
// with the other key.
func TestPrivateKeySwapped(t *testing.T) {
	for _, c := range []struct {
		typ softhsmtest.KeyType
		alg apiv1.SignatureAlgorithm
	}{
		{softhsmtest.P256, apiv1.ECDSAWithSHA256},
		{softhsmtest.RSA2048, apiv1.SHA256WithRSA},
	} {
		t.Run(string(c.typ), func(t *testing.T) {
			tok := softhsmtest.NewToken(t, "stepswap")
			id := []byte{0x73, 0x01}
			tok.GenerateKey(t, c.typ, id, "ca-key")
			srv := softhsmtest.StartServer(t, tok)
			k, err := New(context.Background(), apiv1.Options{Type: apiv1.PKCS11, URI: kmsURI(srv.Module(), tok, ";max-sessions=1")})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				if err := k.Close(); err != nil {
					t.Error(err)
				}
			})
			name := "pkcs11:id=7301;object=ca-key"
			signer, err := k.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: name})
			if err != nil {
				t.Fatal(err)
			}
			pub := signer.Public()
			issue(t, "Root CA", pub, signer, nil, x509Alg[c.alg], true)

			gen := k.Provider().Generation()
			if err := srv.Kill(); err != nil {
				t.Fatal(err)
			}
			if err := tok.ReplacePrivate(c.typ, id, "ca-key"); err != nil {
				t.Fatal(err)
			}
			if err := srv.Restart(); err != nil {
				t.Fatal(err)
			}
			// The provider finds out about the loss at its next probe or
			// call, and recovers by itself.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			for k.Provider().Generation() == gen {
				if _, err := signer.Sign(rand.Reader, make([]byte, 32), crypto.SHA256); err == nil {
					t.Fatal("signed after the private key was swapped")
				}
				if err := k.Provider().WaitHealthy(ctx); err != nil {
					t.Fatalf("no recovery within 30 s: %v", err)
				}
			}
			digest := sha256.Sum256([]byte("swapped"))
			for i := range 200 {
				sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
				if sig != nil || !errors.Is(err, hsm.ErrKeyChanged) {
					t.Fatalf("signature %d after the swap: %x, %v; want hsm.ErrKeyChanged", i, sig, err)
				}
				if i == 0 {
					t.Log(err)
				}
			}
			if !samePublic(signer.Public(), pub) {
				t.Fatal("Public() changed")
			}
		})
	}
}

func samePublic(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}
