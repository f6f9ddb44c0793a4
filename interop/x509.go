package main

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"strings"
	"time"
)

// A ca is a self-signed root whose key is on the token.
type ca struct {
	name  string // e.g. "ECDSA P-384"
	key   string // label of its key
	other string // label of another key of the same type: the broken leaf's signer
	alg   x509.SignatureAlgorithm
	cert  *x509.Certificate
}

// The CAs openssl verify checks. The first one also issues the TLS
// servers' certificates.
var cas = []*ca{
	{name: "ECDSA P-384 CA", key: "p384", other: "p384-b", alg: x509.ECDSAWithSHA384},
	{name: "RSA PKCS #1 v1.5 CA", key: "rsa", other: "rsa-b", alg: x509.SHA256WithRSA},
	{name: "RSA-PSS CA", key: "rsa", other: "rsa-b", alg: x509.SHA256WithRSAPSS},
	{name: "Ed25519 CA", key: "ed25519", other: "ed25519-b", alg: x509.PureEd25519},
}

// root makes c's self-signed certificate, signed by its token key.
func (r *runner) root(c *ca) error {
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{Organization: []string{"hsm interop"}, CommonName: c.name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		SignatureAlgorithm:    c.alg,
	}
	key := r.key(c.key)
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return fmt.Errorf("%s: %w", c.name, err)
	}
	c.cert, err = x509.ParseCertificate(der)
	return err
}

// issue makes a TLS server certificate for 127.0.0.1 and localhost with
// the public key pub, signed by c's token key.
func (r *runner) issue(c *ca, cn string, pub crypto.PublicKey) (*x509.Certificate, error) {
	tmpl := &x509.Certificate{
		SerialNumber:       serial(),
		Subject:            pkix.Name{Organization: []string{"hsm interop"}, CommonName: cn},
		NotBefore:          time.Now().Add(-time.Hour),
		NotAfter:           time.Now().Add(24 * time.Hour),
		KeyUsage:           x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:        []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:        []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:           []string{"localhost"},
		SignatureAlgorithm: c.alg,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, pub, r.key(c.key))
	if err != nil {
		return nil, fmt.Errorf("%s issuing %q: %w", c.name, cn, err)
	}
	return x509.ParseCertificate(der)
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n
}

// signed is the outer structure of a certificate and of a CSR (RFC 5280
// 4.1, RFC 2986 4.2): what is signed, the algorithm, the signature.
type signed struct {
	TBS       asn1.RawValue
	Algorithm asn1.RawValue
	Signature asn1.BitString
}

// resign returns der (a certificate or a CSR) with its signature replaced
// by key's signature over the same content with the same algorithm: a
// well-formed signature by the wrong key.
func resign(der []byte, key crypto.Signer, alg x509.SignatureAlgorithm) ([]byte, error) {
	var s signed
	if rest, err := asn1.Unmarshal(der, &s); err != nil || len(rest) > 0 {
		return nil, fmt.Errorf("resign: not a signed structure: %v", err)
	}
	var digest []byte
	var opts crypto.SignerOpts
	switch alg {
	case x509.ECDSAWithSHA256, x509.SHA256WithRSA:
		d := sha256.Sum256(s.TBS.FullBytes)
		digest, opts = d[:], crypto.SHA256
	case x509.ECDSAWithSHA384:
		d := sha512.Sum384(s.TBS.FullBytes)
		digest, opts = d[:], crypto.SHA384
	case x509.SHA256WithRSAPSS:
		d := sha256.Sum256(s.TBS.FullBytes)
		digest, opts = d[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: crypto.SHA256}
	case x509.PureEd25519:
		digest, opts = s.TBS.FullBytes, crypto.Hash(0)
	default:
		return nil, fmt.Errorf("resign: algorithm %v", alg)
	}
	sig, err := key.Sign(rand.Reader, digest, opts)
	if err != nil {
		return nil, fmt.Errorf("resign: %w", err)
	}
	s.Signature = asn1.BitString{Bytes: sig, BitLength: 8 * len(sig)}
	return asn1.Marshal(s)
}

func pemOf(typ string, der ...[]byte) []byte {
	var b []byte
	for _, d := range der {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: d})...)
	}
	return b
}

// A csrCase is a CSR signed by a token key.
type csrCase struct {
	name       string
	key, other string
	alg        x509.SignatureAlgorithm
}

var csrCases = []csrCase{
	{"CSR ECDSA P-256", "p256", "p256-b", x509.ECDSAWithSHA256},
	{"CSR RSA PKCS #1 v1.5", "rsa", "rsa-b", x509.SHA256WithRSA},
	{"CSR RSA-PSS", "rsa", "rsa-b", x509.SHA256WithRSAPSS},
	{"CSR Ed25519", "ed25519", "ed25519-b", x509.PureEd25519},
}

// x509Checks: openssl verify on a leaf issued by each CA (and on the leaf
// signed by another key of the CA's type: refused), and openssl req
// -verify on CSRs (and on a CSR signed by another key: refused).
func x509Checks(r *runner) {
	for i, c := range cas {
		if c.cert == nil {
			if err := r.root(c); err != nil {
				r.check("X.509", c.name, "openssl verify", true, failed(err))
				continue
			}
		}
		root, err := r.write(fmt.Sprintf("ca%d.pem", i), pemOf("CERTIFICATE", c.cert.Raw))
		if err != nil {
			r.check("X.509", c.name, "openssl verify", true, failed(err))
			continue
		}
		leaf, err := r.issue(c, "leaf of "+c.name, r.key("p256").Public())
		if err != nil {
			r.check("X.509", c.name, "openssl verify", true, failed(err))
			continue
		}
		bad, errBad := resign(leaf.Raw, r.key(c.other), c.alg)
		for _, v := range []struct {
			accept bool
			name   string
			der    []byte
			err    error
		}{
			{true, c.name + " → leaf", leaf.Raw, nil},
			{false, c.name + " → leaf, signed by another key", bad, errBad},
		} {
			file := fmt.Sprintf("leaf%d-%v.pem", i, v.accept)
			r.check("X.509", v.name, "openssl verify", v.accept, func(ctx context.Context) (bool, string, error) {
				if v.err != nil {
					return false, "", v.err
				}
				return r.opensslVerify(ctx, root, file, v.der)
			})
		}
	}
	for i, c := range csrCases {
		tmpl := &x509.CertificateRequest{
			Subject:            pkix.Name{Organization: []string{"hsm interop"}, CommonName: c.name},
			DNSNames:           []string{"localhost"},
			SignatureAlgorithm: c.alg,
		}
		good, err := x509.CreateCertificateRequest(rand.Reader, tmpl, r.key(c.key))
		var bad []byte
		errBad := err
		if err == nil {
			bad, errBad = resign(good, r.key(c.other), c.alg)
		}
		for _, v := range []struct {
			accept bool
			name   string
			der    []byte
			err    error
		}{
			{true, c.name, good, err},
			{false, c.name + ", signed by another key", bad, errBad},
		} {
			file := fmt.Sprintf("csr%d-%v.pem", i, v.accept)
			r.check("X.509", v.name, "openssl req -verify", v.accept, func(ctx context.Context) (bool, string, error) {
				if v.err != nil {
					return false, "", v.err
				}
				return r.opensslReqVerify(ctx, file, v.der)
			})
		}
	}
}

// failed is a check that could not be made.
func failed(err error) func(context.Context) (bool, string, error) {
	return func(context.Context) (bool, string, error) { return false, "", err }
}

// opensslVerify runs openssl verify on the certificate der, trusting the
// root in file root; the self-signature of the root is checked too
// (-check_ss_sig). It accepts with exit 0 and "FILE: OK"; the refusal
// that a signature by another key must cause is error 7, "certificate
// signature failure".
func (r *runner) opensslVerify(ctx context.Context, root, file string, der []byte) (bool, string, error) {
	if _, err := r.write(file, pemOf("CERTIFICATE", der)); err != nil {
		return false, "", err
	}
	out, code, err := r.exec(ctx, "", "openssl", "verify", "-x509_strict", "-check_ss_sig", "-CAfile", root, file)
	if err != nil {
		return false, "", err
	}
	switch {
	case code == 0 && strings.Contains(out, file+": OK"):
		return true, file + ": OK", nil
	case code != 0 && strings.Contains(out, "certificate signature failure"):
		return false, fmt.Sprintf("exit %d, certificate signature failure", code), nil
	}
	return false, "", fmt.Errorf("openssl verify: exit %d, neither OK nor a signature failure: %s", code, lastLines(out, 4))
}

// opensslReqVerify runs openssl req -verify on the CSR der. Its exit code
// says nothing (OpenSSL 3.0 exits 0 on a bad signature): the output
// does, "verify OK" or "verify failure".
func (r *runner) opensslReqVerify(ctx context.Context, file string, der []byte) (bool, string, error) {
	if _, err := r.write(file, pemOf("CERTIFICATE REQUEST", der)); err != nil {
		return false, "", err
	}
	out, code, err := r.exec(ctx, "", "openssl", "req", "-in", file, "-noout", "-verify")
	if err != nil {
		return false, "", err
	}
	ok, failure := strings.Contains(out, "verify OK"), strings.Contains(out, "verify failure")
	switch {
	case ok && !failure:
		return true, fmt.Sprintf("exit %d, %s", code, lastLines(out, 1)), nil
	case failure && !ok:
		return false, fmt.Sprintf("exit %d, %s", code, firstLine(out, "verify failure")), nil
	}
	return false, "", fmt.Errorf("openssl req -verify: exit %d, neither verify OK nor verify failure: %s", code, lastLines(out, 4))
}

// firstLine returns the first line of out that contains s.
func firstLine(out, s string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, s) {
			return strings.TrimSpace(l)
		}
	}
	return ""
}
