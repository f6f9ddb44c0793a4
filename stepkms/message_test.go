package stepkms

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"testing"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"go.step.sm/crypto/kms/apiv1"
)

// TestSignMessage: the KMS's signers are crypto.MessageSigners (what
// crypto/x509 and crypto/tls use when present), as hsm's durable keys are:
// the message is signed as Sign signs its digest, and after the KMS's Close
// they fail with hsm.ErrClosed.
func TestSignMessage(t *testing.T) {
	tok := softhsmtest.NewToken(t, "stepmsg")
	k, err := New(context.Background(), apiv1.Options{Type: apiv1.PKCS11, URI: kmsURI(softhsmtest.SoftHSMModule, tok, "")})
	if err != nil {
		t.Fatal(err)
	}
	const name = "pkcs11:id=7340;object=msg-key"
	resp, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: name, SignatureAlgorithm: apiv1.ECDSAWithSHA256})
	if err != nil {
		t.Fatal(err)
	}
	s, err := k.CreateSigner(&resp.CreateSignerRequest)
	if err != nil {
		t.Fatal(err)
	}
	ms, ok := s.(crypto.MessageSigner)
	if !ok {
		t.Fatalf("%T is not a crypto.MessageSigner", s)
	}
	msg := []byte("a message, hashed by whoever signs it")
	sig, err := ms.SignMessage(nil, msg, crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256(msg)
	if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatal("SignMessage's signature does not verify over the message's SHA-256")
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := ms.SignMessage(nil, msg, crypto.SHA256); !errors.Is(err, hsm.ErrClosed) {
		t.Fatalf("SignMessage after Close: %v, want hsm.ErrClosed", err)
	}
}
