package hsm

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// selfSigned makes a certificate for s, signed by s.
func selfSigned(t *testing.T, s *Signer, algo x509.SignatureAlgorithm) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber:       big.NewInt(time.Now().UnixNano()),
		Subject:            pkix.Name{CommonName: "hsm.test"},
		DNSNames:           []string{"hsm.test"},
		NotBefore:          time.Now().Add(-time.Minute),
		NotAfter:           time.Now().Add(time.Hour),
		KeyUsage:           x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:        []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		SignatureAlgorithm: algo,
		IsCA:               true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, s.Public(), s)
	if err != nil {
		t.Fatalf("CreateCertificate: %v", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	if err := cert.CheckSignatureFrom(cert); err != nil {
		t.Fatalf("self-signature (%v) does not verify: %v", cert.SignatureAlgorithm, err)
	}
	return cert
}

func TestX509(t *testing.T) {
	p := openShared(t)
	tests := []struct {
		key  string
		algo x509.SignatureAlgorithm
	}{
		{"rsa2048", x509.SHA256WithRSA},
		{"rsa2048", x509.SHA512WithRSA},
		{"rsa2048", x509.SHA256WithRSAPSS},
		{"rsa3072", x509.SHA384WithRSAPSS},
		{"p256", x509.ECDSAWithSHA256},
		{"p384", x509.ECDSAWithSHA384},
		{"p521", x509.ECDSAWithSHA512},
		{"ed25519", x509.PureEd25519},
	}
	for _, tt := range tests {
		t.Run(tt.key+"/"+tt.algo.String(), func(t *testing.T) {
			s := mustSigner(t, p, tt.key)
			cert := selfSigned(t, s, tt.algo)
			if cert.SignatureAlgorithm != tt.algo {
				t.Fatalf("signature algorithm %v", cert.SignatureAlgorithm)
			}
			csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
				Subject: pkix.Name{CommonName: "csr.test"}, SignatureAlgorithm: tt.algo,
			}, s)
			if err != nil {
				t.Fatalf("CreateCertificateRequest: %v", err)
			}
			csr, err := x509.ParseCertificateRequest(csrDER)
			if err != nil {
				t.Fatal(err)
			}
			if err := csr.CheckSignature(); err != nil {
				t.Fatalf("CSR signature: %v", err)
			}
		})
	}
}

// TestTLSHandshakes: crypto/tls with HSM keys of every type, TLS 1.2
// (RSA PKCS #1 v1.5 or PSS, ECDSA, Ed25519) and TLS 1.3 (RSA-PSS, ECDSA,
// Ed25519).
func TestTLSHandshakes(t *testing.T) {
	p := openShared(t)
	tests := []struct {
		key     string
		version uint16
		schemes []tls.SignatureScheme // offered by the client; nil: default
	}{
		{"rsa2048", tls.VersionTLS12, []tls.SignatureScheme{tls.PKCS1WithSHA256}},
		{"rsa2048", tls.VersionTLS12, []tls.SignatureScheme{tls.PKCS1WithSHA384}},
		{"rsa2048", tls.VersionTLS12, []tls.SignatureScheme{tls.PSSWithSHA256}},
		{"rsa2048", tls.VersionTLS13, nil},
		{"rsa3072", tls.VersionTLS13, []tls.SignatureScheme{tls.PSSWithSHA512}},
		{"p256", tls.VersionTLS12, nil},
		{"p256", tls.VersionTLS13, nil},
		{"p384", tls.VersionTLS13, nil},
		{"p521", tls.VersionTLS13, nil},
		{"ed25519", tls.VersionTLS12, nil},
		{"ed25519", tls.VersionTLS13, nil},
	}
	for _, tt := range tests {
		name := tt.key + "/" + tls.VersionName(tt.version)
		if tt.schemes != nil {
			name += "/" + tt.schemes[0].String()
		}
		t.Run(name, func(t *testing.T) {
			s := mustSigner(t, p, tt.key)
			cert := selfSigned(t, s, 0)
			roots := x509.NewCertPool()
			roots.AddCert(cert)
			server := &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{cert.Raw}, PrivateKey: s}}}
			client := &tls.Config{RootCAs: roots, ServerName: "hsm.test", MinVersion: tt.version, MaxVersion: tt.version}
			if err := handshake(server, client, tt.schemes); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// handshake runs a TLS handshake over a pipe. schemes, if set, restricts
// the signature algorithms the server may use.
func handshake(server, client *tls.Config, schemes []tls.SignatureScheme) error {
	_, err := handshakeState(server, client, schemes)
	return err
}

// handshakeState is handshake returning the client's connection state.
func handshakeState(server, client *tls.Config, schemes []tls.SignatureScheme) (tls.ConnectionState, error) {
	if schemes != nil {
		certs := server.Certificates
		server = server.Clone()
		server.Certificates = nil
		server.GetCertificate = func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			c := certs[0]
			c.SupportedSignatureAlgorithms = schemes
			return &c, nil
		}
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	srv := tls.Server(a, server)
	errc := make(chan error, 1)
	go func() { errc <- srv.Handshake() }()
	cli := tls.Client(b, client)
	cerr := cli.Handshake()
	if cerr != nil {
		b.Close()
	}
	serr := <-errc
	if cerr != nil {
		return tls.ConnectionState{}, cerr
	}
	return cli.ConnectionState(), serr
}

// TestTLSCertificate: a tls.Certificate from the certificate object on the
// token or from PEM, refused for a certificate of another key; served by a
// real handshake.
func TestTLSCertificate(t *testing.T) {
	tok := softhsmtest.NewToken(t, "tlscert")
	tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "srv")
	tok.GenerateKey(t, softhsmtest.RSA2048, []byte{2}, "rsa")
	tok.GenerateKey(t, softhsmtest.P256, []byte{3}, "nocert")

	// Certificates made with the HSM keys, then stored on the token as
	// objects with the keys' CKA_ID (by pkcs11-tool, in its own process).
	p := openToken(t, tok)
	certs := map[string]*x509.Certificate{}
	for _, l := range []string{"srv", "rsa"} {
		certs[l] = selfSigned(t, mustSigner(t, p, l), 0)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	for l, id := range map[string]string{"srv": "01", "rsa": "02"} {
		f := filepath.Join(t.TempDir(), l+".der")
		if err := os.WriteFile(f, certs[l].Raw, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := tok.Tool("--write-object", f, "--type", "cert", "--id", id, "--label", l); err != nil {
			t.Fatal(err)
		}
	}
	p = openToken(t, tok)

	for _, l := range []string{"srv", "rsa"} {
		cert, err := p.TLSCertificate(KeyRef{Label: l}, nil)
		if err != nil {
			t.Fatalf("%s from the token: %v", l, err)
		}
		if !bytes.Equal(cert.Certificate[0], certs[l].Raw) {
			t.Fatalf("%s: not the certificate stored on the token", l)
		}
		if _, ok := cert.PrivateKey.(crypto.Decrypter); ok != (l == "rsa") {
			t.Fatalf("%s: PrivateKey is %T", l, cert.PrivateKey)
		}
		roots := x509.NewCertPool()
		roots.AddCert(certs[l])
		server := &tls.Config{GetCertificate: p.GetCertificate(cert)}
		client := &tls.Config{RootCAs: roots, ServerName: "hsm.test"}
		if err := handshake(server, client, nil); err != nil {
			t.Fatalf("%s: %v", l, err)
		}
		// TLS 1.2 with RSA key exchange: the server decrypts the
		// premaster secret with the HSM key.
		if l == "rsa" {
			server.CipherSuites = []uint16{tls.TLS_RSA_WITH_AES_128_GCM_SHA256}
			client12 := client.Clone()
			client12.MaxVersion = tls.VersionTLS12
			client12.CipherSuites = server.CipherSuites
			ops := p.Stats().Operations
			st, err := handshakeState(server, client12, nil)
			if err != nil {
				t.Fatalf("TLS 1.2 RSA key exchange: %v", err)
			}
			if st.CipherSuite != tls.TLS_RSA_WITH_AES_128_GCM_SHA256 || st.Version != tls.VersionTLS12 {
				t.Fatalf("negotiated %s %s, not RSA key exchange", tls.VersionName(st.Version), tls.CipherSuiteName(st.CipherSuite))
			}
			if p.Stats().Operations != ops+1 {
				t.Fatalf("%d HSM operations for the handshake, want 1 decryption", p.Stats().Operations-ops)
			}
		}
	}

	pemChain := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: certs["srv"].Raw})
	if _, err := p.TLSCertificate(KeyRef{Label: "srv"}, pemChain); err != nil {
		t.Fatalf("from PEM: %v", err)
	}
	_, err := p.TLSCertificate(KeyRef{Label: "nocert"}, pemChain)
	wantErr(t, err, ErrKeyChanged)
	_, err = p.TLSCertificate(KeyRef{Label: "nocert"}, nil)
	wantErr(t, err, ErrKeyNotFound)
	_, err = p.TLSCertificate(KeyRef{Label: "srv"}, []byte("not PEM"))
	wantErr(t, err, ErrInvalidOptions)
}

// TestGetCertificateFailsFast: while the provider is unavailable, the
// GetCertificate function refuses at once, before any handshake signature.
func TestGetCertificateFailsFast(t *testing.T) {
	r := openRemote(t)
	cert, err := r.p.TLSCertificate(KeyRef{Label: "ec"}, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE",
		Bytes: selfSigned(t, mustSigner(t, r.p, "ec"), 0).Raw}))
	if err != nil {
		t.Fatal(err)
	}
	get := r.p.GetCertificate(cert)
	if c, err := get(nil); err != nil || c.Leaf == nil {
		t.Fatalf("healthy: %v", err)
	}
	r.kill(t)
	mustSignerOrLost(t, r.p)
	_, err = get(nil)
	wantErr(t, err, ErrUnavailable)
	r.restart(t)
	if err := r.p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := get(nil); err != nil {
		t.Fatal(err)
	}
	if _, err := r.p.GetClientCertificate(cert)(nil); err != nil {
		t.Fatal(err)
	}
}
