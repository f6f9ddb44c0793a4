package stepkms_test

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"log"
	"math/big"
	"time"

	"github.com/ce46d8f2/hsm/stepkms"
	"go.step.sm/crypto/kms"
	"go.step.sm/crypto/kms/apiv1"
)

// A root CA key made in the HSM, its certificate signed by it and stored
// next to it. The signer survives HSM outages.
func Example() {
	k, err := stepkms.New(context.Background(), apiv1.Options{
		Type: apiv1.PKCS11,
		URI:  "pkcs11:module-path=/usr/lib/softhsm/libsofthsm2.so;token=smallstep?pin-source=/run/secrets/pin",
	})
	if err != nil {
		log.Fatal(err)
	}
	defer k.Close()

	key, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=7330;object=root-key", SignatureAlgorithm: apiv1.ECDSAWithSHA384})
	if err != nil {
		log.Fatal(err)
	}
	signer, err := k.CreateSigner(&key.CreateSignerRequest) // durable: survives HSM outages
	if err != nil {
		log.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Root CA"},
		NotBefore: time.Now(), NotAfter: time.Now().AddDate(10, 0, 0),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.PublicKey, signer)
	if err != nil {
		log.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		log.Fatal(err)
	}
	if err := k.StoreCertificate(&apiv1.StoreCertificateRequest{Name: "pkcs11:id=7330;object=root-cert", Certificate: cert}); err != nil {
		log.Fatal(err)
	}
}

// In a step-ca build, one call makes every pkcs11 KMS (ca.json's "kms"
// with type pkcs11, or a pkcs11: URI) one of this package.
func ExampleRegister() {
	stepkms.Register()

	// What step-ca does with the kms object of its ca.json:
	km, err := kms.New(context.Background(), apiv1.Options{
		Type: apiv1.PKCS11,
		URI:  "pkcs11:module-path=/usr/lib/softhsm/libsofthsm2.so;token=smallstep?pin-source=/run/secrets/pin",
	})
	if err != nil {
		log.Fatal(err)
	}
	defer km.Close()
	_ = km.(*stepkms.KMS) // the recovering backend
}
