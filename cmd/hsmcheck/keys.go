package main

// The key and certificate commands: keygen, list, delete, cert import,
// cert export.

import (
	"bytes"
	"crypto/sha1"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/miekg/pkcs11"
)

// keyTypes are the types keygen makes, by their -type names.
var keyTypes = []struct {
	name string
	typ  hsm.KeyType
}{
	{"rsa2048", hsm.RSA2048}, {"rsa3072", hsm.RSA3072}, {"rsa4096", hsm.RSA4096},
	{"p256", hsm.ECDSAP256}, {"p384", hsm.ECDSAP384}, {"p521", hsm.ECDSAP521},
	{"ed25519", hsm.Ed25519},
}

// parseKeyType reads -type: a name of keyTypes or a KeyType's String
// ("ECDSA P-256"), in any case.
func parseKeyType(s string) (hsm.KeyType, error) {
	if s == "" {
		return 0, usagef("-type is required: rsa2048, rsa3072, rsa4096, p256, p384, p521 or ed25519")
	}
	for _, kt := range keyTypes {
		if strings.EqualFold(s, kt.name) || strings.EqualFold(s, kt.typ.String()) {
			return kt.typ, nil
		}
	}
	return 0, usagef("-type %q: want rsa2048, rsa3072, rsa4096, p256, p384, p521 or ed25519", s)
}

// mechanisms are the mechanisms -mechanisms knows by name: those that
// sign, decrypt or derive with the key types keygen makes.
var mechanisms = map[string]uint{
	"CKM_RSA_PKCS": pkcs11.CKM_RSA_PKCS, "CKM_RSA_PKCS_PSS": pkcs11.CKM_RSA_PKCS_PSS, "CKM_RSA_X_509": pkcs11.CKM_RSA_X_509,
	"CKM_RSA_PKCS_OAEP": pkcs11.CKM_RSA_PKCS_OAEP,
	"CKM_SHA1_RSA_PKCS": pkcs11.CKM_SHA1_RSA_PKCS, "CKM_SHA224_RSA_PKCS": pkcs11.CKM_SHA224_RSA_PKCS,
	"CKM_SHA256_RSA_PKCS": pkcs11.CKM_SHA256_RSA_PKCS, "CKM_SHA384_RSA_PKCS": pkcs11.CKM_SHA384_RSA_PKCS,
	"CKM_SHA512_RSA_PKCS":   pkcs11.CKM_SHA512_RSA_PKCS,
	"CKM_SHA1_RSA_PKCS_PSS": pkcs11.CKM_SHA1_RSA_PKCS_PSS, "CKM_SHA224_RSA_PKCS_PSS": pkcs11.CKM_SHA224_RSA_PKCS_PSS,
	"CKM_SHA256_RSA_PKCS_PSS": pkcs11.CKM_SHA256_RSA_PKCS_PSS, "CKM_SHA384_RSA_PKCS_PSS": pkcs11.CKM_SHA384_RSA_PKCS_PSS,
	"CKM_SHA512_RSA_PKCS_PSS": pkcs11.CKM_SHA512_RSA_PKCS_PSS,
	"CKM_ECDSA":               pkcs11.CKM_ECDSA, "CKM_ECDSA_SHA1": pkcs11.CKM_ECDSA_SHA1, "CKM_ECDSA_SHA224": pkcs11.CKM_ECDSA_SHA224,
	"CKM_ECDSA_SHA256": pkcs11.CKM_ECDSA_SHA256, "CKM_ECDSA_SHA384": pkcs11.CKM_ECDSA_SHA384, "CKM_ECDSA_SHA512": pkcs11.CKM_ECDSA_SHA512,
	"CKM_ECDH1_DERIVE": pkcs11.CKM_ECDH1_DERIVE, "CKM_EDDSA": 0x1057,
}

// parseMechanisms reads -mechanisms: names of mechanisms (with or without
// CKM_, in any case) or numbers (0x43, 67), comma-separated. Empty: none.
func parseMechanisms(s string) ([]uint, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out []uint
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		name := strings.ToUpper(f)
		if !strings.HasPrefix(name, "CKM_") {
			name = "CKM_" + name
		}
		if m, ok := mechanisms[name]; ok {
			out = append(out, m)
			continue
		}
		n, err := strconv.ParseUint(f, 0, 64)
		if err != nil || f == "" {
			return nil, usagef("-mechanisms: %q is neither a mechanism hsmcheck knows by name (e.g. CKM_SHA256_RSA_PKCS_PSS) nor a number (e.g. 0x43)", f)
		}
		out = append(out, uint(n))
	}
	return out, nil
}

// mechanismNames names ms, by name where -mechanisms knows one.
func mechanismNames(ms []uint) string {
	names := make([]string, len(ms))
	for i, m := range ms {
		names[i] = fmt.Sprintf("0x%x", m)
		for n, v := range mechanisms {
			if v == m {
				names[i] = n
			}
		}
	}
	return strings.Join(names, ",")
}

// parseID reads -id: hex digits, optionally with a 0x prefix or colons
// between the bytes (01:02).
func parseID(s string) ([]byte, error) {
	h := strings.ReplaceAll(strings.TrimPrefix(strings.TrimPrefix(s, "0x"), "0X"), ":", "")
	id, err := hex.DecodeString(h)
	if err != nil || len(id) == 0 {
		return nil, usagef("-id %q: want the ID in hex, e.g. 01 or a1b2c3", s)
	}
	return id, nil
}

// keyRef is the key that -label and -id name, each in place of the URI's
// object= and id=. It may be empty.
func keyRef(uri, label, id string) (hsm.KeyRef, error) {
	var ref hsm.KeyRef
	if id != "" {
		var err error
		if ref.ID, err = parseID(id); err != nil {
			return ref, err
		}
	}
	u, err := hsm.ParseURI(uri)
	if err != nil {
		return ref, err
	}
	if label == "" {
		label = u.Object
	}
	if len(ref.ID) == 0 {
		ref.ID = u.ID
	}
	ref.Label = label
	return ref, nil
}

// namedKey is keyRef for the commands that need a key.
func namedKey(uri, label, id string) (hsm.KeyRef, error) {
	ref, err := keyRef(uri, label, id)
	if err == nil && ref.Label == "" && len(ref.ID) == 0 {
		err = usagef("no key: give -label or -id (or object= or id= in the URI)")
	}
	return ref, err
}

func keygen(uri, typ, label, id string, decrypt, derive, deriveSign bool, mechs string, w io.Writer) error {
	t, err := parseKeyType(typ)
	if err != nil {
		return err
	}
	allowed, err := parseMechanisms(mechs)
	if err != nil {
		return err
	}
	ref, err := keyRef(uri, label, id)
	if err != nil {
		return err
	}
	if ref.Label == "" {
		return usagef("a key needs a label: give -label (or object= in the URI)")
	}
	p, err := open(uri)
	if err != nil {
		return err
	}
	defer p.Close()
	s, err := p.GenerateKey(hsm.KeySpec{Type: t, Label: ref.Label, ID: ref.ID, Decrypt: decrypt, Derive: derive, DeriveAndSign: deriveSign, AllowedMechanisms: allowed})
	if err != nil {
		return err
	}
	der, err := x509.MarshalPKIXPublicKey(s.Public())
	if err != nil {
		return fmt.Errorf("generated %v, but its public key does not encode: %v", s.KeyRef(), err)
	}
	got := s.KeyRef()
	fmt.Fprintf(w, "label: %q\nid:    %s\ntype:  %v\n", got.Label, hex.EncodeToString(got.ID), t)
	if len(allowed) > 0 {
		fmt.Fprintf(w, "mechanisms: %s\n", mechanismNames(allowed))
	}
	return pem.Encode(w, &pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

func uses(k hsm.KeyInfo) string {
	var use []string
	if k.CanSign {
		use = append(use, "sign")
	}
	if k.CanDecrypt {
		use = append(use, "decrypt")
	}
	if k.CanDerive {
		use = append(use, "derive")
	}
	if len(use) == 0 {
		return "-"
	}
	return strings.Join(use, ",")
}

func list(uri string, w io.Writer) error {
	p, err := open(uri)
	if err != nil {
		return err
	}
	defer p.Close()
	keys, err := p.Keys()
	if err != nil {
		return err
	}
	width := 0 // of the references, to align the columns
	for _, k := range keys {
		width = max(width, len(k.Ref.String()))
	}
	fmt.Fprintf(w, "private keys: %d\n", len(keys))
	for _, k := range keys {
		fmt.Fprintf(w, "  %-*s  %-14s %s\n", width, k.Ref, k.Type, uses(k))
	}
	// Package hsm lists no certificate objects: ask for the certificate of
	// each key (by the key's CKA_ID, or its label without one).
	// Certificates without a private key on the token (CA certificates of
	// a chain, the certificate of a deleted key) are not listed.
	var lines []string
	failed := 0
	for _, k := range keys {
		if strings.HasPrefix(k.Type, "unsupported") {
			continue // the key cannot be looked up; the list above says why
		}
		c, err := p.Certificate(k.Ref)
		switch {
		case errors.Is(err, hsm.ErrKeyNotFound):
			continue
		case err != nil:
			failed++
			lines = append(lines, fmt.Sprintf("  %-*s  error: %v", width, k.Ref, err))
			continue
		}
		lines = append(lines, fmt.Sprintf("  %-*s  subject %q, issuer %q, not after %s",
			width, k.Ref, c.Subject, c.Issuer, c.NotAfter.UTC().Format(time.RFC3339)))
	}
	fmt.Fprintf(w, "certificates of the keys: %d (certificates without a private key are not listed)\n", len(lines)-failed)
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
	if failed > 0 {
		return fmt.Errorf("the certificates of %d keys could not be read (see above)", failed)
	}
	return nil
}

// matches reports whether k is a key ref selects.
func matches(ref hsm.KeyRef, k hsm.KeyInfo) bool {
	return (ref.Label == "" || ref.Label == k.Ref.Label) && (len(ref.ID) == 0 || bytes.Equal(ref.ID, k.Ref.ID))
}

func deleteKey(uri, label, id string, w io.Writer) error {
	p, ref, err := openKey(uri, label, id)
	if err != nil {
		return err
	}
	defer p.Close()
	// What is deleted, for the report: DeleteKey says nothing of it, and
	// it deletes keys that Signer cannot use.
	what := ref.String()
	if keys, err := p.Keys(); err == nil {
		var found []hsm.KeyInfo
		for _, k := range keys {
			if matches(ref, k) {
				found = append(found, k)
			}
		}
		if len(found) == 1 {
			what = fmt.Sprintf("%s (%s)", found[0].Ref, found[0].Type)
		}
	}
	if err := p.DeleteKey(ref); err != nil {
		return err
	}
	fmt.Fprintf(w, "deleted the private key and its public half: %s\n", what)
	return nil
}

// readCerts reads a PEM file of CERTIFICATE blocks, or one DER
// certificate.
func readCerts(file string) ([]*x509.Certificate, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	if !bytes.Contains(data, []byte("-----BEGIN")) {
		c, err := x509.ParseCertificate(data)
		if err != nil {
			return nil, fmt.Errorf("%s: neither PEM nor a DER certificate: %v", file, err)
		}
		return []*x509.Certificate{c}, nil
	}
	var certs []*x509.Certificate
	for rest := data; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue // a key or parameters next to the certificates
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: certificate %d: %v", file, len(certs)+1, err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("%s: no CERTIFICATE block", file)
	}
	return certs, nil
}

func importCert(uri, label, id, in string, w io.Writer) error {
	if in == "" {
		return usagef("-in is required")
	}
	if _, err := namedKey(uri, label, id); err != nil { // a usage error before the file's
		return err
	}
	certs, err := readCerts(in)
	if err != nil {
		return err
	}
	p, ref, err := openKey(uri, label, id)
	if err != nil {
		return err
	}
	defer p.Close()
	// The key must be there: ImportCertificate would store a certificate
	// for a reference no key has as a chain certificate.
	s, err := p.Signer(ref)
	if err != nil {
		return err
	}
	ref = s.KeyRef()
	if err := p.ImportCertificate(ref, certs[0]); err != nil {
		return err
	}
	fmt.Fprintf(w, "imported the certificate %q for %s\n", certs[0].Subject, ref)
	for _, c := range certs[1:] {
		// Labelled by the common name, identified by the subject key
		// identifier: the CKA_ID its CA's key has when the key is on the
		// token too (hsm.GenerateKey's default), and so a key with the same
		// label but another ID is not taken for the CA's.
		cn := c.Subject.CommonName
		if cn == "" {
			cn = c.Subject.String()
		}
		ref := hsm.KeyRef{ID: subjectKeyID(c), Label: cn}
		err := p.ImportCertificate(ref, c)
		switch {
		case errors.Is(err, hsm.ErrKeyExists):
			fmt.Fprintf(w, "skipped the chain certificate %q: a certificate with its ID (%s) is on the token\n", c.Subject, ref)
		case err != nil:
			return fmt.Errorf("chain certificate %q: %w", c.Subject, err)
		default:
			fmt.Fprintf(w, "imported the chain certificate %q as %s\n", c.Subject, ref)
		}
	}
	return nil
}

func exportCert(uri, label, id string, chain bool, out string, w io.Writer) error {
	p, ref, err := openKey(uri, label, id)
	if err != nil {
		return err
	}
	defer p.Close()
	var certs []*x509.Certificate
	if chain {
		certs, err = p.CertificateChain(ref)
	} else {
		var c *x509.Certificate
		c, err = p.Certificate(ref)
		certs = []*x509.Certificate{c}
	}
	if err != nil {
		return err
	}
	var buf bytes.Buffer
	for _, c := range certs {
		pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	if out == "" {
		_, err := w.Write(buf.Bytes())
		return err
	}
	if err := os.WriteFile(out, buf.Bytes(), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(w, "wrote %d certificates of %s to %s\n", len(certs), ref, out)
	return nil
}

// subjectKeyID is c's subject key identifier, or the SHA-1 of its public
// key's bits (RFC 5280 method 1) when it has none.
func subjectKeyID(c *x509.Certificate) []byte {
	if len(c.SubjectKeyId) > 0 {
		return c.SubjectKeyId
	}
	var spki struct {
		Algorithm        pkix.AlgorithmIdentifier
		SubjectPublicKey asn1.BitString
	}
	if _, err := asn1.Unmarshal(c.RawSubjectPublicKeyInfo, &spki); err != nil {
		sum := sha1.Sum(c.RawSubjectPublicKeyInfo)
		return sum[:]
	}
	sum := sha1.Sum(spki.SubjectPublicKey.Bytes)
	return sum[:]
}

// openKey opens the token of uri and names the key of -label/-id (or the
// URI's object/id); the caller closes the provider.
func openKey(uri, label, id string) (*hsm.Provider, hsm.KeyRef, error) {
	ref, err := namedKey(uri, label, id)
	if err != nil {
		return nil, ref, err
	}
	p, err := open(uri)
	return p, ref, err
}
