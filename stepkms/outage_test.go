package stepkms

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"go.step.sm/crypto/kms/apiv1"
)

// TestOutage runs step-ca's flow against a network HSM (SoftHSM behind
// p11-kit), kills the HSM in the middle, brings it back, and checks that
// the signer and decrypter made before the outage work again, with no new
// KMS and no new CreateSigner.
func TestOutage(t *testing.T) {
	tok := softhsmtest.NewToken(t, "step")
	srv := softhsmtest.StartServer(t, tok)
	// max-sessions=1: p11-kit 0.24's client hangs when the server dies while
	// several threads wait on its socket.
	k, err := New(context.Background(), apiv1.Options{Type: apiv1.PKCS11, URI: kmsURI(srv.Module(), tok, ";max-sessions=1")})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := k.Close(); err != nil {
			t.Error(err)
		}
	}()

	const rootKey, rootCert, decKey = "pkcs11:id=7330;object=root-key", "pkcs11:id=7330;object=root-cert", "pkcs11:id=7331;object=decrypt-key"
	root, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: rootKey, SignatureAlgorithm: apiv1.ECDSAWithSHA256})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: decKey, SignatureAlgorithm: apiv1.SHA256WithRSAPSS, Bits: 2048}); err != nil {
		t.Fatal(err)
	}
	signer, err := k.CreateSigner(&root.CreateSignerRequest)
	if err != nil {
		t.Fatal(err)
	}
	dec, err := k.CreateDecrypter(&apiv1.CreateDecrypterRequest{DecryptionKey: decKey})
	if err != nil {
		t.Fatal(err)
	}
	rc := issue(t, "Root CA", root.PublicKey, signer, nil, x509.ECDSAWithSHA256, true)
	if err := k.StoreCertificate(&apiv1.StoreCertificateRequest{Name: rootCert, Certificate: rc}); err != nil {
		t.Fatal(err)
	}
	ct, err := rsa.EncryptOAEP(sha256.New(), rand.Reader, dec.Public().(*rsa.PublicKey), []byte("secret"), nil)
	if err != nil {
		t.Fatal(err)
	}
	gen := k.Provider().Generation()

	// The HSM is lost.
	if err := srv.Kill(); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	digest := sha256.Sum256([]byte("during the outage"))
	_, err = signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if !errors.Is(err, hsm.ErrDeviceLost) && !errors.Is(err, hsm.ErrUnavailable) {
		t.Fatalf("sign with the HSM killed: %v, want hsm.ErrDeviceLost or hsm.ErrUnavailable", err)
	}
	failed := time.Since(killed)
	// Every operation now fails fast, without touching the dead HSM.
	if _, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{Name: rootCert}); !errors.Is(err, hsm.ErrUnavailable) {
		t.Errorf("load certificate during the outage: %v, want hsm.ErrUnavailable", err)
	}
	if _, err := dec.Decrypt(rand.Reader, ct, &rsa.OAEPOptions{Hash: crypto.SHA256}); !errors.Is(err, hsm.ErrUnavailable) {
		t.Errorf("decrypt during the outage: %v, want hsm.ErrUnavailable", err)
	}
	if _, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=01;object=new"}); !errors.Is(err, hsm.ErrUnavailable) {
		t.Errorf("create key during the outage: %v, want hsm.ErrUnavailable", err)
	}

	// The HSM is back: the provider recovers by itself.
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	restarted := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := k.Provider().WaitHealthy(ctx); err != nil {
		t.Fatalf("no recovery within 30 s of the restart: %v (last error %v)", err, k.Provider().LastError())
	}
	healthy := time.Since(restarted)
	if g := k.Provider().Generation(); g <= gen {
		t.Errorf("generation %d after recovery, want more than %d", g, gen)
	}

	// The same signer issues an intermediate; the same decrypter decrypts.
	ic := issue(t, "Intermediate CA", root.PublicKey, signer, rc, x509.ECDSAWithSHA256, true)
	signed := time.Since(restarted)
	if err := ic.CheckSignatureFrom(rc); err != nil {
		t.Error(err)
	}
	if got, err := dec.Decrypt(rand.Reader, ct, &rsa.OAEPOptions{Hash: crypto.SHA256}); err != nil || string(got) != "secret" {
		t.Errorf("decrypt after recovery: %q, %v", got, err)
	}
	if got, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{Name: rootCert}); err != nil || !got.Equal(rc) {
		t.Errorf("load certificate after recovery: %v", err)
	}
	if d, ok := signer.(interface{ Generation() uint64 }); !ok || d.Generation() <= gen {
		t.Errorf("signer %T not re-bound in the new generation", signer)
	}
	t.Logf("sign failed %v after the kill; healthy %v and signed %v after the restart (generation %d -> %d)",
		failed, healthy, signed, gen, k.Provider().Generation())

	// A key made after recovery works too, and the clean-up as well.
	if _, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=01;object=new"}); err != nil {
		t.Error(err)
	}
	if err := k.DeleteKey(&apiv1.DeleteKeyRequest{Name: decKey}); err != nil {
		t.Error(err)
	}
}
