//lint:file-ignore SA1019 PKCS #1 v1.5 decryption is part of crypto.Decrypter; the tests need its ciphertexts.

package stepkms

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"go.step.sm/crypto/kms/apiv1"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

// kmsURI is a KMS URI in step's form: module-path in the path.
func kmsURI(module string, tok *softhsmtest.Token, extra string) string {
	return "pkcs11:module-path=" + module + ";token=" + url.QueryEscape(tok.Label) + extra + "?pin-value=" + url.QueryEscape(tok.PIN)
}

// open opens a KMS on tok's token through SoftHSM directly and closes it
// when the test ends.
func open(t *testing.T, tok *softhsmtest.Token) *KMS {
	t.Helper()
	k, err := New(context.Background(), apiv1.Options{Type: apiv1.PKCS11, URI: kmsURI(softhsmtest.SoftHSMModule, tok, "")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := k.Close(); err != nil {
			t.Error(err)
		}
	})
	return k
}

// x509Alg is the certificate signature algorithm for a step algorithm.
var x509Alg = map[apiv1.SignatureAlgorithm]x509.SignatureAlgorithm{
	apiv1.UnspecifiedSignAlgorithm: x509.ECDSAWithSHA256,
	apiv1.ECDSAWithSHA256:          x509.ECDSAWithSHA256,
	apiv1.ECDSAWithSHA384:          x509.ECDSAWithSHA384,
	apiv1.ECDSAWithSHA512:          x509.ECDSAWithSHA512,
	apiv1.SHA256WithRSA:            x509.SHA256WithRSA,
	apiv1.SHA384WithRSA:            x509.SHA384WithRSA,
	apiv1.SHA512WithRSA:            x509.SHA512WithRSA,
	apiv1.SHA256WithRSAPSS:         x509.SHA256WithRSAPSS,
	apiv1.SHA384WithRSAPSS:         x509.SHA384WithRSAPSS,
	apiv1.SHA512WithRSAPSS:         x509.SHA512WithRSAPSS,
	apiv1.PureEd25519:              x509.PureEd25519,
}

var serial int64

// issue makes a certificate for pub signed by signer as issuer (self-signed
// when issuer is nil), as a CA does, and checks its signature.
func issue(t *testing.T, cn string, pub crypto.PublicKey, signer crypto.Signer, issuer *x509.Certificate, alg x509.SignatureAlgorithm, ca bool) *x509.Certificate {
	t.Helper()
	serial++
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		SignatureAlgorithm:    alg,
		BasicConstraintsValid: true,
		IsCA:                  ca,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		DNSNames:              []string{"example.com"},
	}
	if ca {
		tmpl.KeyUsage |= x509.KeyUsageCertSign
	}
	parent := tmpl
	if issuer != nil {
		parent = issuer
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, signer)
	if err != nil {
		t.Fatalf("issue %s: %v", cn, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if issuer == nil {
		issuer = cert
	}
	if err := cert.CheckSignatureFrom(issuer); err != nil {
		t.Fatalf("issue %s: signature does not verify: %v", cn, err)
	}
	return cert
}

func TestCreateKeyEveryAlgorithm(t *testing.T) {
	k := open(t, softhsmtest.NewToken(t, "step"))
	for i, tc := range []struct {
		alg  apiv1.SignatureAlgorithm
		bits int
		want string // type and size of the public key
	}{
		{apiv1.UnspecifiedSignAlgorithm, 0, "P-256"},
		{apiv1.ECDSAWithSHA256, 0, "P-256"},
		{apiv1.ECDSAWithSHA384, 0, "P-384"},
		{apiv1.ECDSAWithSHA512, 0, "P-521"},
		{apiv1.SHA256WithRSA, 2048, "RSA-2048"},
		{apiv1.SHA384WithRSA, 0, "RSA-3072"}, // step's default size
		{apiv1.SHA512WithRSA, 3072, "RSA-3072"},
		{apiv1.SHA256WithRSAPSS, 2048, "RSA-2048"},
		{apiv1.SHA384WithRSAPSS, 3072, "RSA-3072"},
		{apiv1.SHA512WithRSAPSS, 4096, "RSA-4096"},
		{apiv1.PureEd25519, 0, "Ed25519"},
	} {
		t.Run(tc.alg.String()+"/"+tc.want, func(t *testing.T) {
			name := "pkcs11:id=" + string(rune('a'+i)) + "1;object=key-" + tc.want + "-" + tc.alg.String()
			resp, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: name, SignatureAlgorithm: tc.alg, Bits: tc.bits})
			if err != nil {
				t.Fatal(err)
			}
			if resp.Name != name || resp.CreateSignerRequest.SigningKey != name {
				t.Errorf("response names %q, %q; want %q", resp.Name, resp.CreateSignerRequest.SigningKey, name)
			}
			if got := describe(resp.PublicKey); got != tc.want {
				t.Errorf("public key is %s, want %s", got, tc.want)
			}
			pub, err := k.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: name})
			if err != nil {
				t.Fatal(err)
			}
			if !pub.(interface{ Equal(crypto.PublicKey) bool }).Equal(resp.PublicKey) {
				t.Error("GetPublicKey differs from CreateKey's public key")
			}
			signer, err := k.CreateSigner(&resp.CreateSignerRequest)
			if err != nil {
				t.Fatal(err)
			}
			if !durable(signer) {
				t.Errorf("CreateSigner returned %T, want a durable signer", signer)
			}
			issue(t, "root "+tc.want, signer.Public(), signer, nil, x509Alg[tc.alg], true)
		})
	}
}

// durable reports whether key is one of the KMS's durable keys.
func durable(key any) bool {
	switch key := key.(type) {
	case *signer:
		return key.d != nil
	case *decrypter:
		return key.d != nil
	}
	return false
}

// describe names a public key's type and size.
func describe(pub crypto.PublicKey) string {
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		return pub.Curve.Params().Name
	case *rsa.PublicKey:
		return "RSA-" + big.NewInt(int64(pub.N.BitLen())).String()
	case ed25519.PublicKey:
		return "Ed25519"
	}
	return "unknown"
}

// TestStepCAFlow does what step-ca's PKCS#11 set-up does: a root and an
// intermediate key, their certificates stored next to them (same id, other
// label), a leaf issued by the intermediate; then clean-up.
func TestStepCAFlow(t *testing.T) {
	k := open(t, softhsmtest.NewToken(t, "step"))
	const (
		rootKey  = "pkcs11:id=7330;object=root-key"
		rootCert = "pkcs11:id=7330;object=root-cert"
		intKey   = "pkcs11:id=7331;object=intermediate-key"
		intCert  = "pkcs11:id=7331;object=intermediate-cert"
	)
	root, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: rootKey, SignatureAlgorithm: apiv1.ECDSAWithSHA384})
	if err != nil {
		t.Fatal(err)
	}
	inter, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: intKey, SignatureAlgorithm: apiv1.ECDSAWithSHA256})
	if err != nil {
		t.Fatal(err)
	}
	rootSigner, err := k.CreateSigner(&root.CreateSignerRequest)
	if err != nil {
		t.Fatal(err)
	}
	rc := issue(t, "Root CA", root.PublicKey, rootSigner, nil, x509.ECDSAWithSHA384, true)
	ic := issue(t, "Intermediate CA", inter.PublicKey, rootSigner, rc, x509.ECDSAWithSHA384, true)
	for name, c := range map[string]*x509.Certificate{rootCert: rc, intCert: ic} {
		if err := k.StoreCertificate(&apiv1.StoreCertificateRequest{Name: name, Certificate: c}); err != nil {
			t.Fatal(err)
		}
	}
	// step-ca starts: it loads the certificates and makes the signer.
	rc2, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{Name: rootCert})
	if err != nil {
		t.Fatal(err)
	}
	ic2, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{Name: intCert})
	if err != nil {
		t.Fatal(err)
	}
	if !rc2.Equal(rc) || !ic2.Equal(ic) {
		t.Fatal("loaded certificates differ from the stored ones")
	}
	// With the serial number (hexadecimal), as step's backend allows.
	for _, s := range []string{rc.SerialNumber.Text(16), "0" + rc.SerialNumber.Text(16), "0x" + rc.SerialNumber.Text(16)} {
		if _, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{Name: rootCert + ";serial=" + s}); err != nil {
			t.Errorf("load with the right serial %s: %v", s, err)
		}
	}
	if _, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{Name: rootCert + ";serial=ffff"}); !errors.Is(err, apiv1.NotFoundError{}) {
		t.Errorf("load with another serial: %v, want NotFoundError", err)
	}
	intSigner, err := k.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: intKey})
	if err != nil {
		t.Fatal(err)
	}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leaf := issue(t, "leaf", leafKey.Public(), intSigner, ic2, x509.ECDSAWithSHA256, false)
	roots, inters := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(rc2)
	inters.AddCert(ic2)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inters, DNSName: "example.com"}); err != nil {
		t.Fatalf("leaf does not verify up to the root: %v", err)
	}

	// A second certificate under the same name is refused, as in step.
	err = k.StoreCertificate(&apiv1.StoreCertificateRequest{Name: rootCert, Certificate: rc})
	if !errors.Is(err, apiv1.AlreadyExistsError{}) || !errors.Is(err, hsm.ErrKeyExists) {
		t.Errorf("store twice: %v, want AlreadyExistsError", err)
	}

	// Clean-up.
	if err := k.DeleteCertificate(&apiv1.DeleteCertificateRequest{Name: intCert}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{Name: intCert}); !errors.Is(err, apiv1.NotFoundError{}) {
		t.Errorf("load after delete: %v, want NotFoundError", err)
	}
	if err := k.DeleteCertificate(&apiv1.DeleteCertificateRequest{Name: intCert}); !errors.Is(err, apiv1.NotFoundError{}) {
		t.Errorf("delete certificate twice: %v, want NotFoundError", err)
	}
	if err := k.DeleteKey(&apiv1.DeleteKeyRequest{Name: intKey}); err != nil {
		t.Fatal(err)
	}
	for _, f := range []func() error{
		func() error { _, err := k.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: intKey}); return err },
		func() error { _, err := k.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: intKey}); return err },
		func() error { return k.DeleteKey(&apiv1.DeleteKeyRequest{Name: intKey}) },
	} {
		if err := f(); !errors.Is(err, apiv1.NotFoundError{}) || !errors.Is(err, hsm.ErrKeyNotFound) {
			t.Errorf("after DeleteKey: %v, want NotFoundError and hsm.ErrKeyNotFound", err)
		}
	}
	// The signer made before the deletion fails too, and does not panic.
	if _, err := intSigner.Sign(rand.Reader, make([]byte, 32), crypto.SHA256); err == nil {
		t.Error("signer of a deleted key still signs")
	}
	// The root still works.
	issue(t, "another intermediate", inter.PublicKey, rootSigner, rc, x509.ECDSAWithSHA384, true)
}

func TestCreateKeyExists(t *testing.T) {
	k := open(t, softhsmtest.NewToken(t, "step"))
	const name = "pkcs11:id=01;object=ca"
	if _, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: name}); err != nil {
		t.Fatal(err)
	}
	for _, again := range []string{
		name,                      // the same
		"pkcs11:id=02;object=ca",  // the same label
		"pkcs11:id=01;object=ca2", // the same id
		"pkcs11:object=ca",        // only the label, which a key has
		"pkcs11:id=01",            // only the id, which a key has
	} {
		_, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: again, SignatureAlgorithm: apiv1.SHA256WithRSA, Bits: 2048})
		if !errors.Is(err, apiv1.AlreadyExistsError{}) || !errors.Is(err, hsm.ErrKeyExists) {
			t.Errorf("CreateKey %s: %v, want AlreadyExistsError and hsm.ErrKeyExists", again, err)
		}
	}
	// Only one key is there.
	resp, err := k.SearchKeys(&apiv1.SearchKeysRequest{Query: "pkcs11:"})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Results) != 1 {
		t.Errorf("%d keys on the token, want 1", len(resp.Results))
	}
}

func TestDecrypter(t *testing.T) {
	k := open(t, softhsmtest.NewToken(t, "step"))
	resp, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=0d;object=decrypt", SignatureAlgorithm: apiv1.SHA256WithRSA, Bits: 2048})
	if err != nil {
		t.Fatal(err)
	}
	d, err := k.CreateDecrypter(&apiv1.CreateDecrypterRequest{DecryptionKey: resp.Name})
	if err != nil {
		t.Fatal(err)
	}
	if !durable(d) {
		t.Errorf("CreateDecrypter returned %T, want a durable decrypter", d)
	}
	pub := d.Public().(*rsa.PublicKey)
	msg := []byte("a session key, 32 bytes long....")

	// Not SHA-1 with a label: SoftHSM 2.6 takes a label with SHA-1 at
	// C_DecryptInit and then ignores it, so that a ciphertext made with a
	// label fails and one made without decrypts under any label (a matter
	// for package hsm, reported there).
	for _, tc := range []struct {
		h     crypto.Hash
		label string
	}{{crypto.SHA1, ""}, {crypto.SHA256, ""}, {crypto.SHA256, "label"}, {crypto.SHA384, "label"}, {crypto.SHA512, "l"}} {
		ct, err := rsa.EncryptOAEP(tc.h.New(), rand.Reader, pub, msg, []byte(tc.label))
		if err != nil {
			t.Fatal(err)
		}
		got, err := d.Decrypt(rand.Reader, ct, &rsa.OAEPOptions{Hash: tc.h, Label: []byte(tc.label)})
		if err != nil || string(got) != string(msg) {
			t.Errorf("OAEP %v label %q: %q, %v", tc.h, tc.label, got, err)
		}
		if tc.h == crypto.SHA1 {
			continue
		}
		if _, err := d.Decrypt(rand.Reader, ct, &rsa.OAEPOptions{Hash: tc.h, Label: []byte("other")}); !errors.Is(err, hsm.ErrDecryption) {
			t.Errorf("OAEP %v with another label: %v, want hsm.ErrDecryption", tc.h, err)
		}
	}
	ct, err := rsa.EncryptPKCS1v15(rand.Reader, pub, msg)
	if err != nil {
		t.Fatal(err)
	}
	for _, opts := range []crypto.DecrypterOpts{nil, &rsa.PKCS1v15DecryptOptions{}, &rsa.PKCS1v15DecryptOptions{SessionKeyLen: 32}} {
		got, err := d.Decrypt(rand.Reader, ct, opts)
		if err != nil || string(got) != string(msg) {
			t.Errorf("PKCS #1 v1.5 %#v: %q, %v", opts, got, err)
		}
	}
	// The same key signs, through CreateSigner.
	s, err := k.CreateSigner(&resp.CreateSignerRequest)
	if err != nil {
		t.Fatal(err)
	}
	digest := sha256.Sum256(msg)
	sig, err := s.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := rsa.VerifyPKCS1v15(pub, crypto.SHA256, digest[:], sig); err != nil {
		t.Error(err)
	}
	// Nil opts: an error, not a panic.
	if _, err := s.Sign(rand.Reader, digest[:], nil); err == nil {
		t.Error("RSA Sign with nil opts did not fail")
	}

	// EC keys do not decrypt.
	ec, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=0e;object=ec"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := k.CreateDecrypter(&apiv1.CreateDecrypterRequest{DecryptionKey: ec.Name}); !errors.Is(err, hsm.ErrUnsupportedKey) {
		t.Errorf("EC decrypter: %v, want hsm.ErrUnsupportedKey", err)
	}
}

func TestSearchKeys(t *testing.T) {
	tok := softhsmtest.NewToken(t, "step")
	// A key made outside step, with a binary ID and a label with a space.
	tok.GenerateKey(t, softhsmtest.P256, []byte{0xca, 0xfe}, "made by pkcs11-tool")
	k := open(t, tok)
	if _, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=7331;object=one"}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=7332;object=two", SignatureAlgorithm: apiv1.SHA256WithRSAPSS, Bits: 2048}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		query string
		want  []string
	}{
		{"pkcs11:", []string{"pkcs11:id=7331;object=one", "pkcs11:id=7332;object=two", "pkcs11:id=cafe;object=made+by+pkcs11-tool"}},
		{"pkcs11:object=two", []string{"pkcs11:id=7332;object=two"}},
		{"pkcs11:id=7331", []string{"pkcs11:id=7331;object=one"}},
		{"pkcs11:id=%ca%fe", []string{"pkcs11:id=cafe;object=made+by+pkcs11-tool"}},
		{"pkcs11:object=made%20by%20pkcs11-tool", []string{"pkcs11:id=cafe;object=made+by+pkcs11-tool"}},
		{"pkcs11:object=three", nil},
	} {
		resp, err := k.SearchKeys(&apiv1.SearchKeysRequest{Query: tc.query})
		if err != nil {
			t.Fatalf("%s: %v", tc.query, err)
		}
		var got []string
		for _, r := range resp.Results {
			got = append(got, r.Name)
			if r.CreateSignerRequest.SigningKey != r.Name || r.PublicKey == nil {
				t.Errorf("%s: result %+v", tc.query, r)
			}
			// Every name found is usable.
			s, err := k.CreateSigner(&r.CreateSignerRequest)
			if err != nil {
				t.Errorf("%s: CreateSigner(%s): %v", tc.query, r.Name, err)
			} else if !s.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(r.PublicKey) {
				t.Errorf("%s: %s has another public key than found", tc.query, r.Name)
			}
		}
		slices.Sort(got)
		if strings.Join(got, " ") != strings.Join(tc.want, " ") {
			t.Errorf("%s: %q, want %q", tc.query, got, tc.want)
		}
	}
}

// TestKeyNames checks that a key name's id is read as step reads it.
func TestKeyNames(t *testing.T) {
	k := open(t, softhsmtest.NewToken(t, "step"))
	resp, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=7331;object=my+key"})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{
		"pkcs11:id=7331",
		"pkcs11:id=0x7331",
		"pkcs11:id=73:31",
		"pkcs11:id=%73%31",     // the bytes "s1" themselves
		"pkcs11:id=s1",         // the same, not hex
		"pkcs11:object=my+key", // '+' is a space, as in step
		"pkcs11:object=my%20key",
		"pkcs11:id=7331;object=my%20key",
		"pkcs11:token=ignored;id=7331?pin-value=ignored", // other attributes are ignored, as in step
	} {
		pub, err := k.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: name})
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if !pub.(*ecdsa.PublicKey).Equal(resp.PublicKey) {
			t.Errorf("%s: another key", name)
		}
	}
	// An odd number of hex digits gets a leading zero: id=abc is 0a bc.
	if _, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=abc;object=odd"}); err != nil {
		t.Fatal(err)
	}
	if _, err := k.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: "pkcs11:id=%0a%bc"}); err != nil {
		t.Errorf("id=abc is not 0abc: %v", err)
	}
}

func TestNewForms(t *testing.T) {
	tok := softhsmtest.NewToken(t, "step")
	pinFile := filepath.Join(t.TempDir(), "pin")
	if err := os.WriteFile(pinFile, []byte(tok.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	mod, label := softhsmtest.SoftHSMModule, url.QueryEscape(tok.Label)
	for _, tc := range []struct {
		name string
		opts apiv1.Options
	}{
		{"step's form", apiv1.Options{URI: "pkcs11:module-path=" + mod + ";token=" + label + "?pin-value=" + tok.PIN}},
		{"RFC 7512 form", apiv1.Options{URI: "pkcs11:token=" + label + "?module-path=" + mod + "&pin-value=" + tok.PIN}},
		{"serial", apiv1.Options{URI: "pkcs11:module-path=" + mod + ";serial=" + tok.Serial + "?pin-value=" + tok.PIN}},
		{"opts.Pin", apiv1.Options{URI: "pkcs11:module-path=" + mod + ";token=" + label, Pin: tok.PIN}},
		{"pin-source path", apiv1.Options{URI: "pkcs11:module-path=" + mod + ";token=" + label + "?pin-source=" + pinFile}},
		{"pin-source file URI", apiv1.Options{URI: "pkcs11:module-path=" + mod + ";token=" + label + "?pin-source=file:" + pinFile}},
		{"pin-value before opts.Pin", apiv1.Options{URI: "pkcs11:module-path=" + mod + ";token=" + label + "?pin-value=" + tok.PIN, Pin: "not the PIN"}},
		{"max-sessions", apiv1.Options{URI: "pkcs11:module-path=" + mod + ";token=" + label + ";max-sessions=2?pin-value=" + tok.PIN}},
		{"object attributes ignored", apiv1.Options{URI: "pkcs11:module-path=" + mod + ";token=" + label + ";id=01;object=x?pin-value=" + tok.PIN}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := New(context.Background(), tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			defer k.Close()
			if got := k.Provider().TokenInfo().Serial; got != tok.Serial {
				t.Errorf("token serial %q, want %q", got, tok.Serial)
			}
			if _, err := k.SearchKeys(&apiv1.SearchKeysRequest{Query: "pkcs11:"}); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestNewBadURIs(t *testing.T) {
	tok := softhsmtest.NewToken(t, "step")
	const secret = "s3cr3t-PIN"
	mod, label := softhsmtest.SoftHSMModule, url.QueryEscape(tok.Label)
	dir := t.TempDir()
	for _, tc := range []struct {
		uri  string
		want error
		says string
	}{
		{"", hsm.ErrURI, "empty"},
		{"pkcs11:", hsm.ErrURI, "no token"},
		{"softkms:token=x", hsm.ErrURI, "not pkcs11"},
		{"token=x", hsm.ErrURI, "no scheme"},
		{"pkcs11://token=x", hsm.ErrURI, "directly"},
		{"pkcs11:token=%zz?pin-value=" + secret, hsm.ErrURI, "escape"},
		{"pkcs11:token=x?pin-value=%" + secret, hsm.ErrURI, "query"},
		{"pkcs11:token=a;serial=b?pin-value=" + secret, hsm.ErrURI, "mutually exclusive"},
		{"pkcs11:token=a;slot-id=1?pin-value=" + secret, hsm.ErrURI, "mutually exclusive"},
		{"pkcs11:serial=a;slot-id=1?pin-value=" + secret, hsm.ErrURI, "mutually exclusive"},
		{"pkcs11:token=a;token=b?pin-value=" + secret, hsm.ErrURI, "twice"},
		{"pkcs11:token=a?module-path=/x&module-path=/y", hsm.ErrURI, "twice"},
		{"pkcs11:module-path=/x;token=a?module-path=/y", hsm.ErrURI, "twice"},
		{"pkcs11:slot-id=abc?pin-value=" + secret, hsm.ErrURI, "slot-id"},
		{"pkcs11:slot-id=-1?pin-value=" + secret, hsm.ErrURI, "slot-id"},
		{"pkcs11:token=x;max-sessions=many?pin-value=" + secret, hsm.ErrURI, "max-sessions"},
		{"pkcs11:token=x;max-sessions=-1?pin-value=" + secret, hsm.ErrURI, "max-sessions"},
		{"pkcs11:token=x;max-session=1?pin-value=" + secret, hsm.ErrURI, `"max-session"`},
		{"pkcs11:module-path=" + mod + ";token=" + label + "?pin-source=" + filepath.Join(dir, "none"), hsm.ErrURI, "pin-source"},
		{"pkcs11:module-path=" + mod + ";token=" + label + "?pin-source=" + dir, hsm.ErrURI, "not a regular file"},
		{"pkcs11:module-path=" + mod + ";token=" + label + "?pin-value=", hsm.ErrURI, "PIN is empty"},
		{"pkcs11:module-path=/nonexistent/module.so;token=" + label + "?pin-value=" + secret, hsm.ErrConfig, "nonexistent"},
		{"pkcs11:module-path=no-such-module.so;token=" + label + "?pin-value=" + secret, hsm.ErrConfig, "not found"},
		{"pkcs11:module-path=" + dir + ";token=" + label + "?pin-value=" + secret, hsm.ErrConfig, "not a regular file"},
		{"pkcs11:module-path=" + mod + ";token=no-such-token?pin-value=" + secret, hsm.ErrTokenNotFound, "no-such-token"},
		{"pkcs11:module-path=" + mod + ";serial=0000?pin-value=" + secret, hsm.ErrTokenNotFound, "0000"},
		{"pkcs11:module-path=" + mod + ";slot-id=4242?pin-value=" + secret, hsm.ErrTokenNotFound, "4242"},
		{"pkcs11:module-path=" + mod + ";token=" + label + "?pin-value=" + secret, hsm.ErrPIN, "PIN"},
	} {
		k, err := New(context.Background(), apiv1.Options{URI: tc.uri})
		if err == nil {
			k.Close()
			t.Errorf("New(%q) succeeded", tc.uri)
			continue
		}
		if k != nil {
			t.Errorf("New(%q) returned a KMS and an error", tc.uri)
		}
		if !errors.Is(err, tc.want) {
			t.Errorf("New(%q): %v, want %v", tc.uri, err, tc.want)
		}
		msg := err.Error()
		if !strings.Contains(msg, tc.says) || !strings.HasPrefix(msg, "stepkms: ") {
			t.Errorf("New(%q): %q does not say %q", tc.uri, msg, tc.says)
		}
		if strings.Contains(msg, secret) {
			t.Errorf("New(%q): the error shows the PIN: %s", tc.uri, msg)
		}
	}
	// A cancelled context.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := New(ctx, apiv1.Options{URI: kmsURI(mod, tok, "")}); !errors.Is(err, context.Canceled) {
		t.Errorf("New with a cancelled context: %v", err)
	}
	// After all that, the module opens.
	open(t, tok)
}

func TestModuleShared(t *testing.T) {
	tok := softhsmtest.NewToken(t, "step")
	k := open(t, tok)
	// hsm.Open of the module, outside this package, shares the module with
	// the KMS's Provider; closing it leaves the KMS as it was.
	p, err := hsm.Open(hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN})
	if err != nil {
		t.Fatalf("hsm.Open with a KMS open: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if st := k.Provider().State(); st != hsm.StateHealthy {
		t.Fatalf("the KMS's provider is %v after another Provider of the module closed", st)
	}
	if err := k.Close(); err != nil {
		t.Fatal(err)
	}
	if err := k.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := k.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: "pkcs11:id=01"}); !errors.Is(err, hsm.ErrClosed) {
		t.Errorf("after Close: %v, want hsm.ErrClosed", err)
	}
	open(t, tok) // the module is free again
}

// TestHostileRequests feeds every method nil, empty and bad requests: each
// gets a clear error, none panics, and none reaches the token.
func TestHostileRequests(t *testing.T) {
	k := open(t, softhsmtest.NewToken(t, "step"))
	if _, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=01;object=ec"}); err != nil {
		t.Fatal(err)
	}
	cert := &x509.Certificate{Raw: []byte{1}}
	calls := []struct {
		name string
		call func() error
		want []error
		says string
	}{
		{"GetPublicKey nil", func() error { _, err := k.GetPublicKey(nil); return err }, []error{ErrInvalidRequest}, "nil request"},
		{"CreateKey nil", func() error { _, err := k.CreateKey(nil); return err }, []error{ErrInvalidRequest}, "nil request"},
		{"CreateSigner nil", func() error { _, err := k.CreateSigner(nil); return err }, []error{ErrInvalidRequest}, "nil request"},
		{"CreateDecrypter nil", func() error { _, err := k.CreateDecrypter(nil); return err }, []error{ErrInvalidRequest}, "nil request"},
		{"LoadCertificate nil", func() error { _, err := k.LoadCertificate(nil); return err }, []error{ErrInvalidRequest}, "nil request"},
		{"StoreCertificate nil", func() error { return k.StoreCertificate(nil) }, []error{ErrInvalidRequest}, "nil request"},
		{"DeleteKey nil", func() error { return k.DeleteKey(nil) }, []error{ErrInvalidRequest}, "nil request"},
		{"DeleteCertificate nil", func() error { return k.DeleteCertificate(nil) }, []error{ErrInvalidRequest}, "nil request"},
		{"SearchKeys nil", func() error { _, err := k.SearchKeys(nil); return err }, []error{ErrInvalidRequest}, "nil request"},

		{"GetPublicKey empty", func() error { _, err := k.GetPublicKey(&apiv1.GetPublicKeyRequest{}); return err }, []error{ErrInvalidRequest}, "name is empty"},
		{"CreateKey empty", func() error { _, err := k.CreateKey(&apiv1.CreateKeyRequest{}); return err }, []error{ErrInvalidRequest}, "name is empty"},
		{"CreateSigner empty", func() error { _, err := k.CreateSigner(&apiv1.CreateSignerRequest{}); return err }, []error{ErrInvalidRequest}, "name is empty"},
		{"CreateDecrypter empty", func() error { _, err := k.CreateDecrypter(&apiv1.CreateDecrypterRequest{}); return err }, []error{ErrInvalidRequest}, "name is empty"},
		{"LoadCertificate empty", func() error { _, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{}); return err }, []error{ErrInvalidRequest}, "name is empty"},
		{"StoreCertificate no certificate", func() error { return k.StoreCertificate(&apiv1.StoreCertificateRequest{Name: "pkcs11:id=01;object=c"}) }, []error{ErrInvalidRequest}, "certificate is nil"},
		{"StoreCertificate empty", func() error { return k.StoreCertificate(&apiv1.StoreCertificateRequest{Certificate: cert}) }, []error{ErrInvalidRequest}, "name is empty"},
		{"DeleteKey empty", func() error { return k.DeleteKey(&apiv1.DeleteKeyRequest{}) }, []error{ErrInvalidRequest}, "name is empty"},
		{"DeleteCertificate empty", func() error { return k.DeleteCertificate(&apiv1.DeleteCertificateRequest{}) }, []error{ErrInvalidRequest}, "name is empty"},
		{"SearchKeys empty", func() error { _, err := k.SearchKeys(&apiv1.SearchKeysRequest{}); return err }, []error{ErrInvalidRequest}, "query is empty"},

		{"name without id or object", func() error { _, err := k.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: "pkcs11:token=x"}); return err }, []error{hsm.ErrURI}, "give id, object or both"},
		{"name of another scheme", func() error {
			_, err := k.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: "awskms:key-id=1"})
			return err
		}, []error{hsm.ErrURI}, "not pkcs11"},
		{"name malformed", func() error {
			_, err := k.CreateDecrypter(&apiv1.CreateDecrypterRequest{DecryptionKey: "pkcs11:id=%g0"})
			return err
		}, []error{hsm.ErrURI}, "escape"},
		{"name not a URI", func() error { return k.DeleteKey(&apiv1.DeleteKeyRequest{Name: "root-key"}) }, []error{hsm.ErrURI}, "no scheme"},
		{"search query malformed", func() error { _, err := k.SearchKeys(&apiv1.SearchKeysRequest{Query: "pkcs11:object=%"}); return err }, []error{hsm.ErrURI}, "escape"},
		{"certificate serial not hex", func() error {
			_, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{Name: "pkcs11:id=01;serial=xyz"})
			return err
		}, []error{hsm.ErrURI}, "serial"},
		{"certificate by serial only", func() error {
			_, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{Name: "pkcs11:serial=01"})
			return err
		}, []error{ErrInvalidRequest, apiv1.NotImplementedError{}}, "give one with the serial"},
		{"certificate name without id or object", func() error {
			_, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{Name: "pkcs11:token=x"})
			return err
		}, []error{ErrInvalidRequest}, "give id, object or both"},

		{"unknown key", func() error {
			_, err := k.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: "pkcs11:id=ff;object=nothing"})
			return err
		},
			[]error{hsm.ErrKeyNotFound, apiv1.NotFoundError{}}, "pkcs11:id=ff;object=nothing"},
		{"unknown signer", func() error {
			_, err := k.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: "pkcs11:object=nothing?pin-value=" + "s3cr3t"})
			return err
		}, []error{hsm.ErrKeyNotFound, apiv1.NotFoundError{}}, "pin-value=REDACTED"},
		{"unknown decrypter", func() error {
			_, err := k.CreateDecrypter(&apiv1.CreateDecrypterRequest{DecryptionKey: "pkcs11:object=nothing"})
			return err
		}, []error{hsm.ErrKeyNotFound, apiv1.NotFoundError{}}, "not found"},
		{"unknown certificate", func() error {
			_, err := k.LoadCertificate(&apiv1.LoadCertificateRequest{Name: "pkcs11:object=nothing"})
			return err
		}, []error{apiv1.NotFoundError{}}, "nothing"},
		{"unknown key deleted", func() error { return k.DeleteKey(&apiv1.DeleteKeyRequest{Name: "pkcs11:id=ff"}) },
			[]error{hsm.ErrKeyNotFound, apiv1.NotFoundError{}}, "not found"},
		{"certificate not parsed", func() error {
			return k.StoreCertificate(&apiv1.StoreCertificateRequest{Name: "pkcs11:id=02;object=c", Certificate: &x509.Certificate{}})
		},
			[]error{hsm.ErrInvalidOptions}, "certificate"},

		// What go.step.sm/crypto v0.92.0 calls ML-DSA-44, -65 and -87 (v0.77.1,
		// which stepkms requires, has no name for them).
		{"ML-DSA-44", func() error { return create(k, apiv1.PureEd25519+1, 0) }, []error{ErrUnsupportedAlgorithm}, (apiv1.PureEd25519 + 1).String()},
		{"ML-DSA-65", func() error { return create(k, apiv1.PureEd25519+2, 0) }, []error{ErrUnsupportedAlgorithm}, (apiv1.PureEd25519 + 2).String()},
		{"ML-DSA-87", func() error { return create(k, apiv1.PureEd25519+3, 0) }, []error{ErrUnsupportedAlgorithm}, (apiv1.PureEd25519 + 3).String()},
		{"unknown algorithm", func() error { return create(k, apiv1.SignatureAlgorithm(99), 0) }, []error{ErrUnsupportedAlgorithm}, "unknown(99)"},
		{"RSA-1024", func() error { return create(k, apiv1.SHA256WithRSA, 1024) }, []error{ErrUnsupportedAlgorithm}, "1024 bits"},
		{"RSA-PSS-8192", func() error { return create(k, apiv1.SHA256WithRSAPSS, 8192) }, []error{ErrUnsupportedAlgorithm}, "8192 bits"},
		{"negative bits", func() error { return create(k, apiv1.SHA256WithRSA, -1) }, []error{ErrInvalidRequest}, "negative"},
		{"CreateKey without id", func() error {
			_, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:object=new"})
			return err
		}, []error{ErrInvalidRequest}, "give both id and object"},
		{"CreateKey without object", func() error {
			_, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=99"})
			return err
		}, []error{ErrInvalidRequest}, "give both id and object"},
		{"StoreCertificate without id", func() error {
			return k.StoreCertificate(&apiv1.StoreCertificateRequest{Name: "pkcs11:object=c", Certificate: cert})
		}, []error{ErrInvalidRequest}, "give both id and object"},
	}
	for _, c := range calls {
		err := c.call()
		if err == nil {
			t.Errorf("%s: no error", c.name)
			continue
		}
		for _, want := range c.want {
			if !errors.Is(err, want) {
				t.Errorf("%s: %v, want it to match %v", c.name, err, want)
			}
		}
		if msg := err.Error(); !strings.Contains(msg, c.says) || !strings.HasPrefix(msg, "stepkms: ") || strings.Contains(msg, "s3cr3t") {
			t.Errorf("%s: %q does not say %q", c.name, msg, c.says)
		}
	}
	// None of them made a key.
	resp, err := k.SearchKeys(&apiv1.SearchKeysRequest{Query: "pkcs11:"})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Results) != 1 {
		t.Errorf("%d keys on the token, want 1", len(resp.Results))
	}

	// A KMS not made by New.
	for _, z := range []*KMS{nil, {}} {
		if _, err := z.GetPublicKey(&apiv1.GetPublicKeyRequest{Name: "pkcs11:id=01"}); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("%#v.GetPublicKey: %v", z, err)
		}
		if _, err := z.SearchKeys(&apiv1.SearchKeysRequest{Query: "pkcs11:"}); !errors.Is(err, ErrInvalidRequest) {
			t.Errorf("%#v.SearchKeys: %v", z, err)
		}
		if err := z.Close(); err != nil {
			t.Errorf("%#v.Close: %v", z, err)
		}
	}
}

func create(k *KMS, alg apiv1.SignatureAlgorithm, bits int) error {
	_, err := k.CreateKey(&apiv1.CreateKeyRequest{Name: "pkcs11:id=1234;object=new", SignatureAlgorithm: alg, Bits: bits})
	return err
}
