//lint:file-ignore SA1019 PKCS #1 v1.5 decryption is part of crypto.Decrypter (crypto/tls uses it for the TLS 1.2 RSA key exchange): the conformance list checks it.

package main

// The conformance list: conform.

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/hpke"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha1"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/url"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/ce46d8f2/hsm"
)

// Results of a conformance check.
const (
	resOK      = "ok"
	resRefused = "refused" // the module cannot do it: not a failure
	resFail    = "FAIL"
)

// conformPrefix starts the label of every key conform generates.
const conformPrefix = "hsmcheck-conform-"

// conformDNSName is the DNS name of conform's self-signed certificate.
const conformDNSName = "hsmcheck-conform.invalid"

type conformRow struct{ check, result, detail string }

// conformance runs the checks and collects their rows.
type conformance struct {
	p    *hsm.Provider
	rows []conformRow
}

func (c *conformance) add(check, result, format string, args ...any) {
	c.rows = append(c.rows, conformRow{check, result, fmt.Sprintf(format, args...)})
}

func (c *conformance) ok(check, format string, args ...any) {
	c.add(check, resOK, format, args...)
}

func (c *conformance) fail(check, format string, args ...any) {
	c.add(check, resFail, format, args...)
}

// outcome adds the row of a check that returned err: refused when the
// module refused it with a CKR code (a mechanism, key size or attribute
// it does not support), because the token is write-protected, or because
// the module made a key hsm cannot use (ErrUnsupportedKey: tpm2-pkcs11
// 1.9 writes a P-521 CKA_EC_POINT that is not DER); FAIL otherwise, and
// for a lost device or a PIN failure. It reports whether err was nil.
func (c *conformance) outcome(check string, err error, format string, args ...any) bool {
	if err == nil {
		c.ok(check, format, args...)
		return true
	}
	var e *hsm.Error
	switch {
	case errors.Is(err, hsm.ErrWriteProtected):
		c.add(check, resRefused, "the token is write-protected")
	case errors.Is(err, hsm.ErrUnsupportedKey) && !errors.Is(err, hsm.ErrDeviceLost):
		c.add(check, resRefused, "%v", err)
	case errors.As(err, &e) && e.Code != 0 && !errors.Is(err, hsm.ErrDeviceLost) && !errors.Is(err, hsm.ErrPIN):
		c.add(check, resRefused, "%s", hsm.CodeName(e.Code))
	default:
		c.fail(check, "%v", err)
	}
	return false
}

func (c *conformance) failed() int {
	n := 0
	for _, r := range c.rows {
		if r.result == resFail {
			n++
		}
	}
	return n
}

func (c *conformance) print(w io.Writer) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "check\tresult\tdetail")
	for _, r := range c.rows {
		fmt.Fprintf(tw, "%s\t%s\t%s\n", r.check, r.result, r.detail)
	}
	tw.Flush()
}

func since(start time.Time) time.Duration {
	d := time.Since(start)
	if d > 10*time.Millisecond {
		return d.Round(time.Millisecond)
	}
	return d.Round(time.Microsecond)
}

func conform(uri string, all, keep, noLogin bool, w io.Writer) error {
	c := &conformance{}
	err := c.run(uri, all, keep, noLogin)
	c.print(w)
	if err != nil {
		return err
	}
	if n := c.failed(); n > 0 {
		return fmt.Errorf("%d of %d checks FAILed (refused is what the module cannot do, not a failure)", n, len(c.rows))
	}
	return nil
}

// generated is a key conform made, to use and delete.
type generated struct {
	typ hsm.KeyType
	s   *hsm.Signer
}

func (c *conformance) run(uri string, all, keep, noLogin bool) error {
	// 1. The module and the token.
	start := time.Now()
	p, err := hsm.OpenURI(uri, hsm.Config{ProbeInterval: -1, DisableAutoRecovery: true, NoLogin: noLogin})
	if err != nil {
		if u, perr := hsm.ParseURI(uri); perr == nil && !noLogin && u.PINValue == "" && u.PINSource == "" && errors.Is(err, hsm.ErrConfig) {
			err = fmt.Errorf("%w: give -nologin", err)
		}
		c.fail("open", "%v", err)
		return err
	}
	defer p.Close()
	c.p = p
	login := "logged in"
	if noLogin {
		login = "no login"
	}
	c.ok("open", "%v, %s", since(start), login)
	if mi, err := p.ModuleInfo(); c.outcome("module info", err, "") {
		c.rows[len(c.rows)-1].detail = fmt.Sprintf("%s %s (library %s, Cryptoki %s)", mi.Manufacturer, mi.LibraryDescription, mi.LibraryVersion, mi.CryptokiVersion)
	}
	if ti := p.TokenInfo(); ti.Serial == "" && ti.Label == "" {
		c.fail("token info", "empty: no label, no serial")
	} else {
		c.ok("token info", "%q serial %s, %s %s", ti.Label, ti.Serial, ti.Manufacturer, ti.Model)
	}
	start = time.Now()
	if keys, err := p.Keys(); c.outcome("list keys", err, "") {
		c.rows[len(c.rows)-1].detail = fmt.Sprintf("%d private keys, %v", len(keys), since(start))
	}

	// 2. Generation and signatures.
	types := []hsm.KeyType{hsm.RSA2048, hsm.ECDSAP256, hsm.ECDSAP384, hsm.ECDSAP521, hsm.Ed25519}
	if all {
		types = []hsm.KeyType{hsm.RSA2048, hsm.RSA3072, hsm.RSA4096, hsm.ECDSAP256, hsm.ECDSAP384, hsm.ECDSAP521, hsm.Ed25519}
	}
	var keys []generated
	defer func() { c.cleanup(keys, keep) }()
	for _, t := range types {
		s := c.generate(t, useSign)
		if s == nil {
			continue
		}
		keys = append(keys, generated{t, s})
		c.signChecks(t, s)
	}

	// 3. RSA decryption.
	if s := c.generate(hsm.RSA2048, useDecrypt); s != nil {
		keys = append(keys, generated{hsm.RSA2048, s})
		c.decryptChecks(s.KeyRef())
	}

	// 3b. Key agreement (ECDH) with EC keys that only derive.
	for _, t := range []hsm.KeyType{hsm.ECDSAP256, hsm.ECDSAP384, hsm.ECDSAP521} {
		if s := c.generate(t, useDerive); s != nil {
			keys = append(keys, generated{t, s})
			c.ecdhCheck(t, s.KeyRef())
		}
	}

	// Steps 4 to 8 use the P-256 key, or the first key made when the
	// module refused P-256.
	var key *hsm.Signer
	for _, k := range keys {
		if k.typ == hsm.ECDSAP256 {
			key = k.s
			break
		}
	}
	with := ""
	if key == nil {
		for _, k := range keys {
			if l := k.s.KeyRef().Label; !strings.HasSuffix(l, "-decrypt") && !strings.HasSuffix(l, "-derive") {
				key, with = k.s, fmt.Sprintf(" (with %v: no P-256 key)", k.typ)
				break
			}
		}
	}
	// Random needs no key.
	buf := make([]byte, 64)
	start = time.Now()
	if _, err := io.ReadFull(p.Random(), buf); c.outcome("random", err, "64 bytes, %v", since(start)) && bytes.Count(buf, buf[:1]) == len(buf) {
		c.rows[len(c.rows)-1] = conformRow{"random", resFail, fmt.Sprintf("64 bytes all %#02x", buf[0])}
	}
	if key == nil {
		for _, check := range []string{"certificate", "reinitialize", "TLS 1.3 handshake", "URI lookup"} {
			c.fail(check, "not run: no key was generated")
		}
		return nil
	}
	ref := key.KeyRef()

	// A certificate on the token.
	cert := c.certificateChecks(key, with)

	// 6. Re-initialization.
	c.reinitChecks(key, with)

	// 7. TLS.
	c.tlsCheck(ref, cert, with)

	// 8. The key by URI.
	c.uriCheck(uri, ref, with)
	return nil
}

// typeName is keygen's name of t, for labels.
func typeName(t hsm.KeyType) string {
	for _, kt := range keyTypes {
		if kt.typ == t {
			return kt.name
		}
	}
	return strings.ToLower(t.String())
}

// use is what a generated key is for, besides signing: its label's and
// check's suffix, and its KeySpec.
type use uint8

const (
	useSign use = iota
	useDecrypt
	useDerive
)

// generate makes the key of type t for u after deleting an earlier one
// with its label, and adds its row. It returns nil when the key was not
// made.
func (c *conformance) generate(t hsm.KeyType, u use) *hsm.Signer {
	label := conformPrefix + typeName(t)
	check := fmt.Sprintf("generate %v", t)
	spec := hsm.KeySpec{Type: t}
	switch u {
	case useDecrypt:
		label, check, spec.Decrypt = label+"-decrypt", check+" (decrypt)", true
	case useDerive:
		label, check, spec.Derive = label+"-derive", check+" (derive)", true
	}
	spec.Label = label
	replaced := ""
	switch deleted, err := c.deleteLabelled(label); {
	case err != nil:
		c.fail(check, "deleting the earlier key %q: %v", label, err)
		return nil
	case deleted:
		replaced = " (replaced an earlier key)"
	}
	start := time.Now()
	s, err := c.p.GenerateKey(spec)
	if c.outcome(check, err, "") {
		c.rows[len(c.rows)-1].detail = fmt.Sprintf("%v, %s%s", since(start), s.KeyRef(), replaced)
		return s
	}
	return nil
}

// ecdhCheck looks up the key-agreement key ref (KeyExchanger: its proof is
// an agreement), agrees with 20 random peers, each compared with
// crypto/ecdh, and opens an HPKE message sealed to the key.
func (c *conformance) ecdhCheck(t hsm.KeyType, ref hsm.KeyRef) {
	check := fmt.Sprintf("ecdh %v", t)
	x, err := c.p.KeyExchanger(ref)
	if !c.outcome(check, err, "") {
		return
	}
	const n = 20
	var took time.Duration
	for i := range n {
		peer, err := x.Curve().GenerateKey(rand.Reader)
		if err != nil {
			c.rows[len(c.rows)-1] = conformRow{check, resFail, fmt.Sprintf("a peer key in Go: %v", err)}
			return
		}
		start := time.Now()
		got, err := x.ECDH(peer.PublicKey())
		took += time.Since(start)
		if err != nil {
			c.rows = c.rows[:len(c.rows)-1]
			if !c.outcome(check, err, "") && i > 0 {
				c.rows[len(c.rows)-1] = conformRow{check, resFail, fmt.Sprintf("agreement %d of %d: %v", i+1, n, err)}
			}
			return
		}
		want, err := peer.ECDH(x.PublicKey())
		if err != nil || !bytes.Equal(got, want) {
			c.rows[len(c.rows)-1] = conformRow{check, resFail, fmt.Sprintf("agreement %d: %x, crypto/ecdh says %x (%v)", i+1, got, want, err)}
			return
		}
	}
	priv, err := hpke.NewDHKEMPrivateKey(x)
	if err != nil {
		c.rows[len(c.rows)-1] = conformRow{check, resFail, fmt.Sprintf("hpke.NewDHKEMPrivateKey: %v", err)}
		return
	}
	msg := []byte("hsmcheck conform")
	ct, err := hpke.Seal(priv.PublicKey(), hpke.HKDFSHA256(), hpke.AES128GCM(), nil, msg)
	if err == nil {
		var pt []byte
		if pt, err = hpke.Open(priv, hpke.HKDFSHA256(), hpke.AES128GCM(), nil, ct); err == nil && !bytes.Equal(pt, msg) {
			err = errors.New("opened to another message")
		}
	}
	if err != nil {
		c.rows[len(c.rows)-1] = conformRow{check, resFail, fmt.Sprintf("HPKE: %v", err)}
		return
	}
	c.rows[len(c.rows)-1].detail = fmt.Sprintf("%d agreements equal to crypto/ecdh's, %v each; HPKE opens", n, (took / n).Round(time.Microsecond))
}

// deleteLabelled deletes the private key labelled label and its
// certificate, if they are there, and reports whether the key was.
func (c *conformance) deleteLabelled(label string) (bool, error) {
	ref := hsm.KeyRef{Label: label}
	if err := c.p.DeleteCertificate(ref); err != nil && !errors.Is(err, hsm.ErrKeyNotFound) {
		return false, err
	}
	err := c.p.DeleteKey(ref)
	if errors.Is(err, hsm.ErrKeyNotFound) {
		return false, nil
	}
	return err == nil, err
}

func (c *conformance) cleanup(keys []generated, keep bool) {
	if len(keys) == 0 || c.p == nil {
		return
	}
	var labels []string
	for _, k := range keys {
		labels = append(labels, k.s.KeyRef().Label)
	}
	if keep {
		c.ok("delete keys", "kept (-keep): %s", strings.Join(labels, ", "))
		return
	}
	var errs []string
	for _, l := range labels {
		if _, err := c.deleteLabelled(l); err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", l, err))
		}
	}
	if len(errs) > 0 {
		c.fail("delete keys", "%s", strings.Join(errs, "; "))
		return
	}
	c.ok("delete keys", "%d keys and their public halves", len(labels))
}

// signCheck signs digest with s and verifies the signature in Go.
func (c *conformance) signCheck(check string, s crypto.Signer, digest []byte, opts crypto.SignerOpts, verify func([]byte) error) {
	start := time.Now()
	sig, err := s.Sign(rand.Reader, digest, opts)
	took := since(start)
	if !c.outcome(check, err, "") {
		return
	}
	if err := verify(sig); err != nil {
		c.rows[len(c.rows)-1] = conformRow{check, resFail, fmt.Sprintf("the signature does not verify: %v", err)}
		return
	}
	c.rows[len(c.rows)-1].detail = fmt.Sprintf("%v, %d-byte signature", took, len(sig))
}

var errBadSignature = errors.New("invalid signature")

func (c *conformance) signChecks(t hsm.KeyType, s *hsm.Signer) {
	msg := []byte("hsmcheck conform")
	switch pub := s.Public().(type) {
	case *rsa.PublicKey:
		d := sha256.Sum256(msg)
		c.signCheck(fmt.Sprintf("sign %v PKCS#1 v1.5 SHA-256", t), s, d[:], crypto.SHA256, func(sig []byte) error {
			return rsa.VerifyPKCS1v15(pub, crypto.SHA256, d[:], sig)
		})
		for _, salt := range []struct {
			name string
			len  int
		}{{"salt=hash", rsa.PSSSaltLengthEqualsHash}, {"salt=auto", rsa.PSSSaltLengthAuto}} {
			opts := &rsa.PSSOptions{SaltLength: salt.len, Hash: crypto.SHA256}
			c.signCheck(fmt.Sprintf("sign %v PSS SHA-256 %s", t, salt.name), s, d[:], opts, func(sig []byte) error {
				return rsa.VerifyPSS(pub, crypto.SHA256, d[:], sig, opts)
			})
		}
	case *ecdsa.PublicKey:
		h := crypto.SHA256
		switch t {
		case hsm.ECDSAP384:
			h = crypto.SHA384
		case hsm.ECDSAP521:
			h = crypto.SHA512
		}
		var d []byte
		switch h {
		case crypto.SHA256:
			x := sha256.Sum256(msg)
			d = x[:]
		case crypto.SHA384:
			x := sha512.Sum384(msg)
			d = x[:]
		default:
			x := sha512.Sum512(msg)
			d = x[:]
		}
		c.signCheck(fmt.Sprintf("sign %v %v", t, h), s, d, h, func(sig []byte) error {
			if !ecdsa.VerifyASN1(pub, d, sig) {
				return errBadSignature
			}
			return nil
		})
	case ed25519.PublicKey:
		c.signCheck(fmt.Sprintf("sign %v pure", t), s, msg, crypto.Hash(0), func(sig []byte) error {
			if !ed25519.Verify(pub, msg, sig) {
				return errBadSignature
			}
			return nil
		})
	default:
		c.fail(fmt.Sprintf("sign %v", t), "public key of type %T", pub)
	}
}

func (c *conformance) decryptChecks(ref hsm.KeyRef) {
	d, err := c.p.Decrypter(ref)
	if !c.outcome("decrypter", err, "%s", ref) {
		return
	}
	pub := d.Public().(*rsa.PublicKey)
	msg := []byte("hsmcheck conform: a secret")
	sessionKey := make([]byte, 32)
	rand.Read(sessionKey)
	label := []byte("hsmcheck")
	// A TPM takes an OAEP label only when it ends in a zero byte
	// (TPM2_RSA_Decrypt): tpm2-pkcs11 refuses label and takes labelNUL.
	labelNUL := []byte("hsmcheck\x00")
	checks := []struct {
		name    string
		plain   []byte
		encrypt func() ([]byte, error)
		opts    crypto.DecrypterOpts
	}{
		{"PKCS#1 v1.5", msg, func() ([]byte, error) { return rsa.EncryptPKCS1v15(rand.Reader, pub, msg) }, &rsa.PKCS1v15DecryptOptions{}},
		{"PKCS#1 v1.5 SessionKeyLen 32", sessionKey, func() ([]byte, error) { return rsa.EncryptPKCS1v15(rand.Reader, pub, sessionKey) },
			&rsa.PKCS1v15DecryptOptions{SessionKeyLen: len(sessionKey)}},
		{"OAEP SHA-1", msg, func() ([]byte, error) { return rsa.EncryptOAEP(sha1.New(), rand.Reader, pub, msg, nil) }, &rsa.OAEPOptions{Hash: crypto.SHA1}},
		{"OAEP SHA-256", msg, func() ([]byte, error) { return rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, msg, nil) }, &rsa.OAEPOptions{Hash: crypto.SHA256}},
		{"OAEP SHA-256 label", msg, func() ([]byte, error) { return rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, msg, label) },
			&rsa.OAEPOptions{Hash: crypto.SHA256, Label: label}},
		{"OAEP SHA-256 label ending in NUL", msg, func() ([]byte, error) { return rsa.EncryptOAEP(sha256.New(), rand.Reader, pub, msg, labelNUL) },
			&rsa.OAEPOptions{Hash: crypto.SHA256, Label: labelNUL}},
	}
	for _, ck := range checks {
		check := "decrypt " + ck.name
		ct, err := ck.encrypt()
		if err != nil {
			c.fail(check, "encrypting in Go: %v", err)
			continue
		}
		start := time.Now()
		got, err := d.Decrypt(rand.Reader, ct, ck.opts)
		took := since(start)
		if !c.outcome(check, err, "%v", took) {
			continue
		}
		if !bytes.Equal(got, ck.plain) {
			c.rows[len(c.rows)-1] = conformRow{check, resFail, fmt.Sprintf("decrypted %d bytes that are not the %d encrypted", len(got), len(ck.plain))}
		}
	}
}

// certificateChecks makes a self-signed certificate with key, stores it,
// reads it back and deletes it. It returns the certificate, or nil.
func (c *conformance) certificateChecks(key *hsm.Signer, with string) *x509.Certificate {
	serial, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "hsmcheck conform"},
		DNSNames:              []string{conformDNSName},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	start := time.Now()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if !c.outcome("certificate create", err, "%v, self-signed%s", since(start), with) {
		return nil
	}
	cert, err := x509.ParseCertificate(der)
	if err == nil {
		err = cert.CheckSignature(cert.SignatureAlgorithm, cert.RawTBSCertificate, cert.Signature)
	}
	if err != nil {
		c.rows[len(c.rows)-1] = conformRow{"certificate create", resFail, err.Error()}
		return nil
	}
	ref := key.KeyRef()
	if !c.outcome("certificate import", c.p.ImportCertificate(ref, cert), "%d bytes", len(der)) {
		return nil
	}
	got, err := c.p.Certificate(ref)
	if c.outcome("certificate read", err, "the same DER") && !bytes.Equal(got.Raw, der) {
		c.rows[len(c.rows)-1] = conformRow{"certificate read", resFail, "another DER than the one imported"}
	}
	if !c.outcome("certificate delete", c.p.DeleteCertificate(ref), "gone") {
		return cert
	}
	if _, err := c.p.Certificate(ref); !errors.Is(err, hsm.ErrKeyNotFound) {
		c.rows[len(c.rows)-1] = conformRow{"certificate delete", resFail, fmt.Sprintf("the certificate is still there: %v", err)}
	}
	return cert
}

func (c *conformance) reinitChecks(key *hsm.Signer, with string) {
	ref := key.KeyRef()
	ds, err := c.p.DurableSigner(ref)
	if err != nil {
		c.fail("reinitialize", "not run: DurableSigner: %v", err)
		return
	}
	start := time.Now()
	gen := c.p.Generation()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	err = c.p.Reinitialize(ctx)
	if !c.outcome("reinitialize", err, "%v, generation %d to %d%s", since(start), gen, c.p.Generation(), with) {
		return
	}
	in, opts, verify := conformInput(key.Public())
	sig, err := key.Sign(rand.Reader, in, opts)
	switch {
	case errors.Is(err, hsm.ErrStaleKey) && sig == nil:
		c.ok("stale signer", "ErrStaleKey, no signature")
	case err == nil:
		c.fail("stale signer", "the Signer of generation %d signed in generation %d", key.Generation(), c.p.Generation())
	default:
		c.fail("stale signer", "not ErrStaleKey: %v", err)
	}
	start = time.Now()
	sig, err = ds.Sign(rand.Reader, in, opts)
	took := since(start)
	switch {
	case err != nil:
		c.fail("durable signer", "after the re-initialization: %v", err)
	case !verify(sig):
		c.fail("durable signer", "after the re-initialization: the signature does not verify")
	default:
		c.ok("durable signer", "signed and verified in generation %d, %v (first use: finds the key again)", ds.Generation(), took)
	}
}

// conformInput is what to sign with a key of pub, how, and a verifier.
func conformInput(pub crypto.PublicKey) ([]byte, crypto.SignerOpts, func([]byte) bool) {
	msg := []byte("hsmcheck conform")
	d := sha256.Sum256(msg)
	switch pub := pub.(type) {
	case *rsa.PublicKey:
		return d[:], crypto.SHA256, func(sig []byte) bool { return rsa.VerifyPKCS1v15(pub, crypto.SHA256, d[:], sig) == nil }
	case *ecdsa.PublicKey:
		// Any digest length signs on any curve; verification truncates
		// the same way.
		return d[:], crypto.SHA256, func(sig []byte) bool { return ecdsa.VerifyASN1(pub, d[:], sig) }
	case ed25519.PublicKey:
		return msg, crypto.Hash(0), func(sig []byte) bool { return ed25519.Verify(pub, msg, sig) }
	}
	return nil, nil, func([]byte) bool { return false }
}

func (c *conformance) tlsCheck(ref hsm.KeyRef, cert *x509.Certificate, with string) {
	const check = "TLS 1.3 handshake"
	if cert == nil {
		c.fail(check, "not run: no certificate")
		return
	}
	// The certificate comes from the token: store it again.
	if err := c.p.ImportCertificate(ref, cert); err != nil {
		c.outcome(check, err, "")
		c.rows[len(c.rows)-1].detail = "importing the certificate again: " + c.rows[len(c.rows)-1].detail
		return
	}
	tc, err := c.p.TLSCertificate(ref, nil)
	if !c.outcome(check, err, "") {
		c.rows[len(c.rows)-1].detail = "TLSCertificate: " + c.rows[len(c.rows)-1].detail
		return
	}
	c.rows = c.rows[:len(c.rows)-1]
	roots := x509.NewCertPool()
	roots.AddCert(cert)
	server := &tls.Config{Certificates: []tls.Certificate{tc}, MinVersion: tls.VersionTLS13}
	client := &tls.Config{RootCAs: roots, ServerName: conformDNSName, MinVersion: tls.VersionTLS13}
	a, b := net.Pipe()
	deadline := time.Now().Add(30 * time.Second)
	a.SetDeadline(deadline)
	b.SetDeadline(deadline)
	// Closing the pipe, not the tls.Conns: a close_notify would wait for a
	// reader that never comes.
	defer a.Close()
	defer b.Close()
	srv, cli := tls.Server(a, server), tls.Client(b, client)
	errc := make(chan error, 1)
	go func() { errc <- srv.Handshake() }()
	start := time.Now()
	cerr := cli.Handshake()
	took := since(start)
	if cerr != nil {
		b.Close() // end the server's handshake too
	}
	serr := <-errc
	switch {
	case serr != nil:
		c.outcome(check, serr, "")
		c.rows[len(c.rows)-1].detail = "server: " + c.rows[len(c.rows)-1].detail
	case cerr != nil:
		c.fail(check, "client: %v", cerr)
	case cli.ConnectionState().Version != tls.VersionTLS13:
		c.fail(check, "version %#x, not TLS 1.3", cli.ConnectionState().Version)
	default:
		c.ok(check, "%v, %s, certificate from the token%s", took, tls.CipherSuiteName(cli.ConnectionState().CipherSuite), with)
	}
}

// withObject returns uri with object=label in place of its object and id.
func withObject(uri, label string) string {
	path, query, hasQuery := strings.Cut(uri, "?")
	attrs := strings.Split(strings.TrimPrefix(path, "pkcs11:"), ";")
	var kept []string
	for _, a := range attrs {
		if a != "" && !strings.HasPrefix(a, "object=") && !strings.HasPrefix(a, "id=") {
			kept = append(kept, a)
		}
	}
	kept = append(kept, "object="+url.PathEscape(label))
	u := "pkcs11:" + strings.Join(kept, ";")
	if hasQuery {
		u += "?" + query
	}
	return u
}

func (c *conformance) uriCheck(uri string, ref hsm.KeyRef, with string) {
	const check = "URI lookup"
	ref2, err := hsm.KeyRefFromURI(withObject(uri, ref.Label))
	if err != nil {
		c.fail(check, "KeyRefFromURI: %v", err)
		return
	}
	s, err := c.p.Signer(ref2)
	if !c.outcome(check, err, "") {
		return
	}
	if got := s.KeyRef(); got.Label != ref.Label || !bytes.Equal(got.ID, ref.ID) {
		c.rows[len(c.rows)-1] = conformRow{check, resFail, fmt.Sprintf("found %s, not %s", got, ref)}
		return
	}
	c.rows[len(c.rows)-1].detail = fmt.Sprintf("object=%s: %s%s", url.PathEscape(ref.Label), s.KeyRef(), with)
}
