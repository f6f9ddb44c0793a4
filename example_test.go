package hsm_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hpke"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// exampleConfig returns the Config of a SoftHSM2 token with an EC P-256 key
// labelled "tls", its self-signed certificate stored next to it, and a
// P-384 key labelled "ca", made once for all examples. In an application
// the Config comes from its configuration, and the certificate from a CA
// (stored with ImportCertificate or `hsmcheck cert import`).
var exampleConfig = sync.OnceValue(func() hsm.Config {
	tok, err := softhsmtest.CreateToken("example")
	if err != nil {
		log.Fatal(err)
	}
	for _, k := range []struct {
		typ   softhsmtest.KeyType
		id    byte
		label string
	}{{softhsmtest.P256, 1, "tls"}, {softhsmtest.P384, 2, "ca"}} {
		if err := tok.Generate(k.typ, []byte{k.id}, k.label); err != nil {
			log.Fatal(err)
		}
	}
	cfg := hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN}
	p, err := hsm.Open(cfg)
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	if err := storeSelfSigned(p, "tls"); err != nil {
		log.Fatal(err)
	}
	return cfg
})

// storeSelfSigned stores on p's token a certificate for the key labelled
// label, for 127.0.0.1 and hsm.example, signed by the key itself: what a CA
// would issue.
func storeSelfSigned(p *hsm.Provider, label string) error {
	key, err := p.DurableSigner(hsm.KeyRef{Label: label})
	if err != nil {
		return err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "hsm.example"},
		DNSNames:     []string{"hsm.example"},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return err
	}
	return p.ImportCertificate(key.KeyRef(), cert)
}

// httpsGet gets serverURL with a client that trusts root and makes a new TLS
// handshake for every request.
func httpsGet(serverURL string, root *x509.Certificate) (string, error) {
	roots := x509.NewCertPool()
	roots.AddCert(root)
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		DisableKeepAlives: true,
	}}
	resp, err := client.Get(serverURL)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	return string(body), err
}

// A TLS server whose key is in the HSM. TLSCertificate makes the
// certificate's private key a durable key, which finds itself again after
// every re-initialization of the PKCS#11 library, so the tls.Config is built
// once; GetCertificate refuses a handshake at once while the HSM is away.
func Example() {
	p, err := hsm.Open(exampleConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()

	// The key labelled "tls" and the certificate stored next to it on the
	// token (nil); or pass the chain as PEM, leaf first.
	cert, err := p.TLSCertificate(hsm.KeyRef{Label: "tls"}, nil)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, "hello over TLS")
		}),
		TLSConfig: &tls.Config{GetCertificate: p.GetCertificate(cert)},
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go srv.ServeTLS(ln, "", "") // the certificate comes from TLSConfig
	defer srv.Close()

	for range 2 {
		body, err := httpsGet("https://"+ln.Addr().String(), cert.Leaf)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(body, "in generation", p.Generation())

		// What recovery from an outage does: every handle of the old
		// generation is dead. The tls.Config stays as it is.
		if err := p.Reinitialize(context.Background()); err != nil {
			log.Fatal(err)
		}
	}
	// Output:
	// hello over TLS in generation 1
	// hello over TLS in generation 2
}

// The HSM is lost and comes back. Here a SoftHSM2 token behind a p11-kit
// server stands for a network HSM, and killing the server for the outage.
// While the HSM is away handshakes fail at once; the provider re-initializes
// by itself when it is back, and the same server, with the same tls.Config,
// serves again.
func Example_tlsServer() {
	tok, err := softhsmtest.CreateToken("outage-example")
	if err != nil {
		log.Fatal(err)
	}
	if err := tok.Generate(softhsmtest.P256, []byte{1}, "tls"); err != nil {
		log.Fatal(err)
	}
	hsmServer, err := softhsmtest.Serve(tok)
	if err != nil {
		log.Fatal(err)
	}
	defer hsmServer.Stop()

	// MaxSessions 1: p11-kit 0.24's client carries one call at a time.
	p, err := hsm.Open(hsm.Config{Path: hsmServer.Module(), TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 1})
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	if err := storeSelfSigned(p, "tls"); err != nil { // the CA's certificate for the key
		log.Fatal(err)
	}
	cert, err := p.TLSCertificate(hsm.KeyRef{Label: "tls"}, nil)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprint(w, "hello over TLS")
		}),
		TLSConfig: &tls.Config{GetCertificate: p.GetCertificate(cert)},
		ErrorLog:  log.New(io.Discard, "", 0), // the handshakes that fail below
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go srv.ServeTLS(ln, "", "")
	defer srv.Close()
	serverURL := "https://" + ln.Addr().String()

	body, err := httpsGet(serverURL, cert.Leaf)
	fmt.Println(body, err)

	if err := hsmServer.Kill(); err != nil { // the HSM is lost
		log.Fatal(err)
	}
	for range 2 {
		_, err = httpsGet(serverURL, cert.Leaf)
		fmt.Println("handshake failed:", err != nil)
	}

	if err := hsmServer.Restart(); err != nil { // the HSM is back
		log.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := p.WaitHealthy(ctx); err != nil {
		log.Fatal(err)
	}
	body, err = httpsGet(serverURL, cert.Leaf)
	fmt.Println(body, err, "in generation", p.Generation())
	// Output:
	// hello over TLS <nil>
	// handshake failed: true
	// handshake failed: true
	// hello over TLS <nil> in generation 2
}

// An HSM key as a certificate authority: x509.CreateCertificate signs with
// a durable key, which a CA can hold for as long as it runs.
func Example_certificateAuthority() {
	p, err := hsm.Open(exampleConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	caKey, err := p.DurableSigner(hsm.KeyRef{Label: "ca"})
	if err != nil {
		log.Fatal(err)
	}

	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "Example HSM CA"},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		log.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)

	leafKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "service.example"},
		DNSNames:     []string{"service.example"},
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &leafKey.PublicKey, caKey)
	if err != nil {
		log.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(leafDER)

	roots := x509.NewCertPool()
	roots.AddCert(ca)
	_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: "service.example"})
	fmt.Println("leaf verifies:", err == nil, leaf.SignatureAlgorithm)
	// Output: leaf verifies: true ECDSA-SHA384
}

// The generation-bound kind, the low level: a Signer is the key as found in
// one generation of the PKCS#11 library. It signs as crypto.Signer says
// (here ECDSA: a digest in, ASN.1 DER out) until the library is
// re-initialized; then it fails with ErrStaleKey (see
// Provider.Reinitialize). Hold a DurableSigner instead where the key lives
// longer than a task.
func ExampleProvider_Signer() {
	p, err := hsm.Open(exampleConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()

	signer, err := p.Signer(hsm.KeyRef{Label: "tls"})
	if err != nil {
		log.Fatal(err)
	}
	digest := sha256.Sum256([]byte("hello"))
	sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(signer, ecdsa.VerifyASN1(signer.Public().(*ecdsa.PublicKey), digest[:], sig))
	// Output: hsm.Signer{ECDSA P-256, label "tls" id 01, generation 1} true
}

// After a re-initialization, generation-bound keys of the earlier
// generation fail fast with ErrStaleKey, without touching the HSM; look
// them up again. (Durable and group keys do that by themselves.)
func ExampleProvider_Reinitialize() {
	p, err := hsm.Open(exampleConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	old, _ := p.Signer(hsm.KeyRef{Label: "tls"})

	// Typically after an error matching hsm.ErrDeviceLost; pass
	// the generation the error carries (hsm.Error.Generation).
	if err := p.ReinitializeFrom(context.Background(), old.Generation()); err != nil {
		log.Fatal(err)
	}

	digest := sha256.Sum256([]byte("hello"))
	_, err = old.Sign(rand.Reader, digest[:], crypto.SHA256)
	fmt.Println(errors.Is(err, hsm.ErrStaleKey), err)

	fresh, _ := p.Signer(hsm.KeyRef{Label: "tls"})
	_, err = fresh.Sign(rand.Reader, digest[:], crypto.SHA256)
	fmt.Println(fresh.Generation(), err)
	// Output:
	// true hsm: sign (generation 1): key belongs to an earlier generation of the PKCS#11 library; look it up again
	// 2 <nil>
}

// A durable key can be held for as long as the provider lives: after a
// re-initialization it finds its key again (once per generation) and checks
// that the public key is still the one it pinned. Hand it to tls.Config once.
func ExampleProvider_DurableSigner() {
	p, err := hsm.Open(exampleConfig())
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	key, err := p.DurableSigner(hsm.KeyRef{Label: "tls"})
	if err != nil {
		log.Fatal(err)
	}
	digest := sha256.Sum256([]byte("hello"))
	for range 3 {
		if err := p.Reinitialize(context.Background()); err != nil {
			log.Fatal(err)
		}
		sig, err := key.Sign(rand.Reader, digest[:], crypto.SHA256)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(key.Generation(), ecdsa.VerifyASN1(key.Public().(*ecdsa.PublicKey), digest[:], sig))
	}
	// Output:
	// 2 true
	// 3 true
	// 4 true
}

// A PKCS#11 URI (RFC 7512) names the module, the token, the PIN's source
// and the key in one configuration string, as p11-kit, GnuTLS and OpenSSL's
// pkcs11-provider do.
func ExampleOpenURI() {
	cfg := exampleConfig()
	uri := "pkcs11:token=" + url.PathEscape(cfg.TokenLabel) + ";object=tls;type=private" +
		"?module-path=" + cfg.Path + "&pin-value=" + cfg.PIN

	p, err := hsm.OpenURI(uri, hsm.Config{MaxSessions: 8})
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	ref, err := hsm.KeyRefFromURI(uri)
	if err != nil {
		log.Fatal(err)
	}
	key, err := p.DurableSigner(ref)
	if err != nil {
		log.Fatal(err)
	}
	u, _ := hsm.ParseURI(uri)
	fmt.Println(ref.Label, key.Public() != nil, strings.Contains(u.String(), "pin-value=REDACTED"))
	// Output: tls true true
}

// A CA generates its key in the HSM, self-signs its certificate, stores it
// on the token next to the key, and issues a leaf certificate.
func ExampleProvider_GenerateKey() {
	tok, err := softhsmtest.CreateToken("ca")
	if err != nil {
		log.Fatal(err)
	}
	p, err := hsm.Open(hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN})
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()

	// The key is made in the HSM: private, sensitive, never extractable,
	// and it signs and does nothing else. GenerateKey returns it
	// generation-bound; hold it as a durable key.
	made, err := p.GenerateKey(hsm.KeySpec{Type: hsm.ECDSAP384, Label: "root ca"})
	if err != nil {
		log.Fatal(err) // hsm.ErrKeyExists if "root ca" is taken: look it up instead
	}
	ca, err := p.DurableSigner(made.KeyRef())
	if err != nil {
		log.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "Example Root CA"},
		NotBefore: time.Now(), NotAfter: time.Now().AddDate(10, 0, 0),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		SubjectKeyId: ca.KeyRef().ID, // the key's CKA_ID is its subject key identifier
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, ca.Public(), ca)
	if err != nil {
		log.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(der)
	if err != nil {
		log.Fatal(err)
	}
	if err := p.ImportCertificate(ca.KeyRef(), caCert); err != nil {
		log.Fatal(err)
	}

	// Later, or in another process: the key and its certificate from the
	// token, and a leaf issued with them.
	signer, err := p.DurableSigner(hsm.KeyRef{Label: "root ca"})
	if err != nil {
		log.Fatal(err)
	}
	stored, err := p.Certificate(hsm.KeyRef{Label: "root ca"})
	if err != nil {
		log.Fatal(err)
	}
	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		log.Fatal(err)
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "service.example"}, DNSNames: []string{"service.example"},
		NotBefore: time.Now(), NotAfter: time.Now().AddDate(0, 0, 90), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, stored, &leafKey.PublicKey, signer)
	if err != nil {
		log.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(leafDER)
	if err != nil {
		log.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(stored)
	_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: "service.example"})
	fmt.Printf("%s issued by %s: verified %v\n", leaf.Subject.CommonName, leaf.Issuer.CommonName, err == nil)
	// Output: service.example issued by Example Root CA: verified true
}

// One key on two HSMs: the group signs while either is up. Here two
// SoftHSM2 tokens hold the same imported key: one in this process, one
// behind a p11-kit server that stands for a network HSM. Two modules, so
// that the loss of one leaves the other: two tokens of one module can be
// members too, but a loss of the module takes them down together.
func ExampleOpenGroup() {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	var toks []*softhsmtest.Token
	for range 2 {
		tok, err := softhsmtest.CreateToken("group-example")
		if err != nil {
			log.Fatal(err)
		}
		if err := tok.Import(key, []byte{1}, "ca"); err != nil {
			log.Fatal(err)
		}
		toks = append(toks, tok)
	}
	networkHSM, err := softhsmtest.Serve(toks[1])
	if err != nil {
		log.Fatal(err)
	}
	defer networkHSM.Stop()
	members := []hsm.Config{
		{Path: softhsmtest.SoftHSMModule, TokenLabel: toks[0].Label, PIN: toks[0].PIN},
		{Path: networkHSM.Module(), TokenLabel: toks[1].Label, PIN: toks[1].PIN, MaxSessions: 1},
	}

	g, err := hsm.OpenGroup(members...)
	if err != nil {
		log.Fatal(err)
	}
	defer g.Close()
	signer, err := g.Signer(hsm.KeyRef{Label: "ca"})
	if err != nil {
		log.Fatal(err)
	}
	digest := sha256.Sum256([]byte("hello"))
	sign := func() {
		sig, err := signer.Sign(rand.Reader, digest[:], crypto.SHA256)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Println(ecdsa.VerifyASN1(&key.PublicKey, digest[:], sig))
	}
	fmt.Println(g.State())
	sign()
	if err := networkHSM.Kill(); err != nil { // the second HSM is lost
		log.Fatal(err)
	}
	for range 3 {
		sign() // no error: a call that fails on the lost member is repeated on the other
	}
	fmt.Println(g.State())
	// Output:
	// healthy
	// true
	// true
	// true
	// true
	// degraded
}

// HPKE (RFC 9180, crypto/hpke) with the recipient's key in the HSM: the
// sender needs only the public key; the key agreement of Open happens on
// the token (CKM_ECDH1_DERIVE), and the shared secret never becomes a
// token object.
func ExampleProvider_KeyExchanger() {
	tok, err := softhsmtest.CreateToken("hpke")
	if err != nil {
		log.Fatal(err)
	}
	p, err := hsm.Open(hsm.Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN})
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()

	// A key that agrees keys and does nothing else (CKA_DERIVE, no CKA_SIGN).
	made, err := p.GenerateKey(hsm.KeySpec{Type: hsm.ECDSAP256, Label: "inbox", Derive: true})
	if err != nil {
		log.Fatal(err)
	}
	kx, err := p.DurableKeyExchanger(made.KeyRef()) // or p.KeyExchanger: generation-bound
	if err != nil {
		log.Fatal(err)
	}
	recipient, err := hpke.NewDHKEMPrivateKey(kx) // kx is an ecdh.KeyExchanger
	if err != nil {
		log.Fatal(err)
	}
	kdf, aead := hpke.HKDFSHA256(), hpke.AES128GCM()

	// The sender, anywhere: the public key is enough.
	sealed, err := hpke.Seal(recipient.PublicKey(), kdf, aead, []byte("example"), []byte("for the HSM's eyes"))
	if err != nil {
		log.Fatal(err)
	}

	opened, err := hpke.Open(recipient, kdf, aead, []byte("example"), sealed)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s\n", opened)
	// Output: for the HSM's eyes
}
