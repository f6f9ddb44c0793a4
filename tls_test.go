package hsm

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"testing"
	"time"
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
		return cerr
	}
	return serr
}
