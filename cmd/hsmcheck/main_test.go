package main

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha512"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

func TestMain(m *testing.M) { os.Exit(softhsmtest.Main(m)) }

func TestCommands(t *testing.T) {
	tok := softhsmtest.NewToken(t, "hsmcheck")
	tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "ec")
	tok.GenerateKey(t, softhsmtest.RSA2048, []byte{2}, "rsa")
	uri := func(pin, object string) string {
		u := "pkcs11:token=" + tok.Label
		if object != "" {
			u += ";object=" + object
		}
		return u + "?module-path=" + softhsmtest.SoftHSMModule + "&pin-value=" + pin
	}
	tests := []struct {
		args     []string
		exit     int
		out, err string
	}{
		{[]string{"probe", "-uri", uri(tok.PIN, "")}, 0, `2 private keys`, ""},
		{[]string{"probe", "-uri", uri(tok.PIN, "")}, 0, `label "rsa" id 02                        RSA-2048`, ""},
		{[]string{"sign", "-uri", uri(tok.PIN, "ec")}, 0, "signed and verified", ""},
		{[]string{"sign", "-uri", uri(tok.PIN, ""), "-key", "rsa"}, 0, "RSA-2048", ""},
		{[]string{"bench", "-uri", uri(tok.PIN, "ec"), "-duration", "300ms", "-workers", "2"}, 0, "signatures in", ""},
		{[]string{"probe", "-uri", uri("0000", "")}, 1, "", "CKR_PIN_INCORRECT"},
		{[]string{"probe", "-uri", strings.Replace(uri(tok.PIN, ""), tok.Label, "absent", 1)}, 1, "", `no token with a label "absent"`},
		{[]string{"probe", "-uri", "pkcs11:token=x?module-path=/etc/hostname&pin-value=1"}, 1, "", "could not be loaded as a PKCS#11 module"},
		{[]string{"probe", "-uri", "pkcs11:token=x?module-path=/nonexistent.so&pin-value=1"}, 1, "", "no such file"},
		{[]string{"sign", "-uri", uri(tok.PIN, "")}, 1, "", "no object or id"},
		{[]string{"sign", "-uri", uri(tok.PIN, "missing")}, 1, "", "key not found"},
		{[]string{"probe"}, 2, "", "-uri is required"},
		{[]string{"frobnicate"}, 2, "", "unknown command"},
		{nil, 2, "", "usage:"},
	}
	for _, tt := range tests {
		var out, errb bytes.Buffer
		code := run(tt.args, &out, &errb)
		if code != tt.exit || !strings.Contains(out.String(), tt.out) || !strings.Contains(errb.String(), tt.err) {
			t.Errorf("hsmcheck %s: exit %d\nstdout: %s\nstderr: %s\nwant exit %d, stdout with %q, stderr with %q",
				strings.Join(tt.args, " "), code, out.String(), errb.String(), tt.exit, tt.out, tt.err)
		}
		if strings.Contains(out.String()+errb.String(), "pin-value="+tok.PIN) {
			t.Errorf("hsmcheck %s printed the PIN", strings.Join(tt.args, " "))
		}
	}
}

// hsmcheck runs the command line args and returns the exit status and
// what it printed.
func hsmcheck(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, &out, &errb)
	return code, out.String(), errb.String()
}

// expect runs args and fails the test unless it exits with exit and
// prints each of outs on stdout and each of errs on stderr. It returns
// stdout.
func expect(t *testing.T, exit int, outs, errs []string, args ...string) string {
	t.Helper()
	code, out, errs2 := hsmcheck(t, args...)
	ok := code == exit
	for _, s := range outs {
		ok = ok && strings.Contains(out, s)
	}
	for _, s := range errs {
		ok = ok && strings.Contains(errs2, s)
	}
	if !ok {
		t.Errorf("hsmcheck %s: exit %d\nstdout: %s\nstderr: %s\nwant exit %d, stdout with %q, stderr with %q",
			strings.Join(args, " "), code, out, errs2, exit, outs, errs)
	}
	return out
}

// keyLine returns the line of list's output that lists ref, in the section
// that starts with section.
func keyLine(out, section, ref string) string {
	_, after, _ := strings.Cut(out, section)
	_, after, _ = strings.Cut(after, "\n")
	for _, l := range strings.Split(after, "\n") {
		if !strings.HasPrefix(l, "  ") {
			break
		}
		if strings.HasPrefix(strings.TrimSpace(l), ref+" ") {
			return l
		}
	}
	return ""
}

// publicKey parses the PUBLIC KEY PEM block of keygen's output.
func publicKey(t *testing.T, out string) crypto.PublicKey {
	t.Helper()
	i := strings.Index(out, "-----BEGIN PUBLIC KEY-----")
	if i < 0 {
		t.Fatalf("no PUBLIC KEY in\n%s", out)
	}
	b, _ := pem.Decode([]byte(out[i:]))
	if b == nil || b.Type != "PUBLIC KEY" {
		t.Fatalf("no PUBLIC KEY block in\n%s", out)
	}
	pub, err := x509.ParsePKIXPublicKey(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return pub
}

func TestKeysAndCertificates(t *testing.T) {
	tok := softhsmtest.NewToken(t, "hsmcheck-keys")
	uri := func(path string) string {
		return "pkcs11:token=" + tok.Label + path + "?module-path=" + softhsmtest.SoftHSMModule + "&pin-value=" + tok.PIN
	}
	u := uri("")

	// keygen: P-256 with the default ID, from the public key.
	out := expect(t, 0, []string{`label: "ec"`, "type:  ECDSA P-256", "-----BEGIN PUBLIC KEY-----"}, nil,
		"keygen", "-uri", u, "-type", "P256", "-label", "ec")
	ecPub, ok := publicKey(t, out).(*ecdsa.PublicKey)
	if !ok || ecPub.Curve != elliptic.P256() {
		t.Fatalf("keygen -type p256 printed a %T public key", publicKey(t, out))
	}
	_, idLine, _ := strings.Cut(out, "id:    ")
	ecID, err := hex.DecodeString(strings.SplitN(idLine, "\n", 2)[0])
	if err != nil || len(ecID) != 20 {
		t.Fatalf("keygen printed the ID %q, want the 20 bytes of a SHA-1 (%v)", strings.SplitN(idLine, "\n", 2)[0], err)
	}
	ecRef := hsm.KeyRef{Label: "ec", ID: ecID}

	// keygen: Ed25519 named by the URI's object= and -id, -type as KeyType's String.
	out = expect(t, 0, []string{`label: "ed"`, "id:    0a0b\n", "type:  Ed25519\n", "-----BEGIN PUBLIC KEY-----"}, nil,
		"keygen", "-uri", uri(";object=ed"), "-type", "Ed25519", "-id", "0a0b")
	edPub, ok := publicKey(t, out).(ed25519.PublicKey)
	if !ok {
		t.Fatalf("keygen -type Ed25519 printed a %T public key", publicKey(t, out))
	}

	// Duplicates: by label, and by ID (under a new label, which must not
	// be created).
	expect(t, 1, nil, []string{"hsmcheck keygen: ", "already on the token", `label "ec"`},
		"keygen", "-uri", u, "-type", "p384", "-label", "ec")
	expect(t, 1, nil, []string{"hsmcheck keygen: ", "already on the token", "id 0a0b"},
		"keygen", "-uri", u, "-type", "rsa2048", "-label", "other", "-id", "0A:0B")

	// list: both keys, their types and uses, nothing else.
	out = expect(t, 0, []string{"private keys: 2\n", "certificates of the keys: 0"}, nil, "list", "-uri", u)
	if l := keyLine(out, "private keys", ecRef.String()); !strings.Contains(l, "ECDSA P-256") || !strings.Contains(l, "sign") {
		t.Errorf("list: the line of %s is %q, want ECDSA P-256 and sign in\n%s", ecRef, l, out)
	}
	if l := keyLine(out, "private keys", `label "ed" id 0a0b`); !strings.Contains(l, "Ed25519") {
		t.Errorf("list: the line of the Ed25519 key is %q, want Ed25519 in\n%s", l, out)
	}
	if strings.Contains(out, `"other"`) {
		t.Errorf("list shows the key of the refused keygen:\n%s", out)
	}

	// Certificates, made with the keys on the token: self-signed for the
	// P-256 key, and for the Ed25519 key one issued by a CA made here.
	p, err := hsm.OpenURI(u, hsm.Config{ProbeInterval: -1, DisableAutoRecovery: true})
	if err != nil {
		t.Fatal(err)
	}
	ecSigner, err := p.Signer(hsm.KeyRef{Label: "ec"})
	if err != nil {
		p.Close()
		t.Fatal(err)
	}
	if !ecSigner.Public().(*ecdsa.PublicKey).Equal(ecPub) || !bytes.Equal(ecSigner.KeyRef().ID, ecID) {
		t.Errorf("keygen printed %x and a public key; the token has %v", ecID, ecSigner)
	}
	tmpl := func(serial int64, cn string, ca bool) *x509.Certificate {
		return &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Date(2036, 1, 2, 3, 4, 5, 0, time.UTC),
			IsCA: ca, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign}
	}
	selfDER, err := x509.CreateCertificate(rand.Reader, tmpl(1, "ec.example", false), tmpl(1, "ec.example", false), ecPub, ecSigner)
	if err != nil {
		p.Close()
		t.Fatal(err)
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := tmpl(2, "Test CA", true)
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leafDER, err := x509.CreateCertificate(rand.Reader, tmpl(3, "ed.example", false), ca, edPub, caKey)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	write := func(name string, ders ...[]byte) string {
		var b bytes.Buffer
		for _, der := range ders {
			pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: der})
		}
		f := filepath.Join(dir, name)
		if err := os.WriteFile(f, b.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
		return f
	}
	pemDERs := func(what string, data []byte) [][]byte {
		var ders [][]byte
		for {
			var b *pem.Block
			if b, data = pem.Decode(data); b == nil {
				break
			}
			if b.Type != "CERTIFICATE" {
				t.Errorf("%s: a %s block", what, b.Type)
			}
			ders = append(ders, b.Bytes)
		}
		return ders
	}

	// cert import: the self-signed certificate for the P-256 key, by -label.
	selfPEM := write("ec.pem", selfDER)
	expect(t, 0, []string{`imported the certificate "CN=ec.example" for ` + ecRef.String()}, nil,
		"cert", "import", "-uri", u, "-in", selfPEM, "-label", "ec")
	// cert export, by the URI's object=, to stdout and to a file.
	out = expect(t, 0, nil, nil, "cert", "export", "-uri", uri(";object=ec"))
	if ders := pemDERs("cert export", []byte(out)); len(ders) != 1 || !bytes.Equal(ders[0], selfDER) {
		t.Errorf("cert export wrote %d certificates, want the one imported:\n%s", len(ders), out)
	}
	exported := filepath.Join(dir, "exported.pem")
	expect(t, 0, []string{"wrote 1 certificates"}, nil, "cert", "export", "-uri", u, "-id", hex.EncodeToString(ecID), "-out", exported)
	data, err := os.ReadFile(exported)
	if err != nil {
		t.Fatal(err)
	}
	if ders := pemDERs("cert export -out", data); len(ders) != 1 || !bytes.Equal(ders[0], selfDER) {
		t.Errorf("cert export -out wrote %d certificates, want the one imported:\n%s", len(ders), data)
	}
	// A second certificate for the key is refused.
	expect(t, 1, nil, []string{"hsmcheck cert import: ", "already on the token"},
		"cert", "import", "-uri", u, "-in", selfPEM, "-label", "ec")
	// A certificate not for the key is refused.
	expect(t, 1, nil, []string{"hsmcheck cert import: ", "is not for the key"},
		"cert", "import", "-uri", u, "-in", write("wrong.pem", leafDER), "-label", "ec")
	// A key that is not there: nothing stored.
	expect(t, 1, nil, []string{"hsmcheck cert import: ", "key not found"},
		"cert", "import", "-uri", u, "-in", selfPEM, "-label", "absent")

	// cert import of a chain, DER too; cert export -chain.
	chainPEM := write("ed.pem", leafDER, caDER)
	expect(t, 0, []string{`imported the certificate "CN=ed.example" for label "ed" id 0a0b`, `imported the chain certificate "CN=Test CA" as label "Test CA"`}, nil,
		"cert", "import", "-uri", u, "-in", chainPEM, "-id", "0a0b")
	out = expect(t, 0, nil, nil, "cert", "export", "-uri", uri(";object=ed"), "-chain")
	if ders := pemDERs("cert export -chain", []byte(out)); len(ders) != 2 || !bytes.Equal(ders[0], leafDER) || !bytes.Equal(ders[1], caDER) {
		t.Errorf("cert export -chain wrote %d certificates, want the leaf and the CA:\n%s", len(ders), out)
	}
	// Again, after deleting the leaf: the CA is skipped; and from DER.
	p, err = hsm.OpenURI(u, hsm.Config{ProbeInterval: -1, DisableAutoRecovery: true})
	if err != nil {
		t.Fatal(err)
	}
	err = p.DeleteCertificate(hsm.KeyRef{Label: "ed"})
	p.Close()
	if err != nil {
		t.Fatal(err)
	}
	expect(t, 0, []string{`imported the certificate "CN=ed.example"`, `skipped the chain certificate "CN=Test CA"`}, nil,
		"cert", "import", "-uri", uri(";object=ed"), "-in", chainPEM)
	p, err = hsm.OpenURI(u, hsm.Config{ProbeInterval: -1, DisableAutoRecovery: true})
	if err != nil {
		t.Fatal(err)
	}
	err = p.DeleteCertificate(hsm.KeyRef{Label: "ed"})
	p.Close()
	if err != nil {
		t.Fatal(err)
	}
	derFile := filepath.Join(dir, "ed.der")
	if err := os.WriteFile(derFile, leafDER, 0o600); err != nil {
		t.Fatal(err)
	}
	expect(t, 0, []string{`imported the certificate "CN=ed.example"`}, nil, "cert", "import", "-uri", uri(";object=ed"), "-in", derFile)

	// list shows the certificates of both keys, not the CA's.
	out = expect(t, 0, []string{"private keys: 2\n", "certificates of the keys: 2 "}, nil, "list", "-uri", u)
	if l := keyLine(out, "certificates of the keys", ecRef.String()); !strings.Contains(l, `subject "CN=ec.example", issuer "CN=ec.example", not after 2036-01-02T03:04:05Z`) {
		t.Errorf("list: the certificate line of %s is %q in\n%s", ecRef, l, out)
	}
	if l := keyLine(out, "certificates of the keys", `label "ed" id 0a0b`); !strings.Contains(l, `subject "CN=ed.example", issuer "CN=Test CA"`) {
		t.Errorf("list: the certificate line of the Ed25519 key is %q in\n%s", l, out)
	}

	// delete: refused without a key; then the P-256 key, which list no
	// longer shows; then again, not found.
	expect(t, 2, nil, []string{"hsmcheck delete: no key: give -label or -id"}, "delete", "-uri", u)
	expect(t, 0, []string{"deleted the private key and its public half: " + ecRef.String() + " (ECDSA P-256)"}, nil,
		"delete", "-uri", u, "-label", "ec")
	out = expect(t, 0, []string{"private keys: 1\n", "certificates of the keys: 1 "}, nil, "list", "-uri", u)
	if strings.Contains(out, `label "ec"`) || keyLine(out, "private keys", `label "ed" id 0a0b`) == "" {
		t.Errorf("list after deleting the P-256 key:\n%s", out)
	}
	expect(t, 1, nil, []string{"hsmcheck delete: ", "key not found"}, "delete", "-uri", u, "-label", "ec")
	// The Ed25519 key signs still.
	expect(t, 0, []string{"signed and verified"}, nil, "sign", "-uri", uri(";object=ed"))
}

func TestKeyCommandsUsage(t *testing.T) {
	u := "pkcs11:token=none?module-path=/nonexistent.so&pin-value=1"
	tests := []struct {
		args []string
		err  string
	}{
		{[]string{"keygen", "-uri", u, "-label", "x"}, "hsmcheck keygen: -type is required"},
		{[]string{"keygen", "-uri", u, "-type", "rsa1024", "-label", "x"}, `hsmcheck keygen: -type "rsa1024": want`},
		{[]string{"keygen", "-uri", u, "-type", "p256"}, "hsmcheck keygen: a key needs a label"},
		{[]string{"keygen", "-uri", u, "-type", "p256", "-label", "x", "-id", "zz"}, `hsmcheck keygen: -id "zz": want the ID in hex`},
		{[]string{"keygen", "-type", "p256", "-label", "x"}, "hsmcheck keygen: -uri is required"},
		{[]string{"keygen", "-uri", u, "-type", "p256", "-label", "x", "-bogus"}, "flag provided but not defined: -bogus"},
		{[]string{"keygen", "-uri", u, "-type", "p256", "-label", "x", "-duration", "1s"}, "flag provided but not defined: -duration"},
		{[]string{"list"}, "hsmcheck list: -uri is required"},
		{[]string{"list", "-uri", u, "extra"}, `hsmcheck list: unexpected argument "extra"`},
		{[]string{"list", "-uri", u, "-label", "x"}, "flag provided but not defined: -label"},
		{[]string{"delete", "-uri", u}, "hsmcheck delete: no key"},
		{[]string{"delete", "-uri", u, "ec"}, `hsmcheck delete: unexpected argument "ec"`},
		{[]string{"cert"}, "hsmcheck cert: want a subcommand: import or export"},
		{[]string{"cert", "frob"}, `hsmcheck cert: want a subcommand: import or export (not "frob")`},
		{[]string{"cert", "import", "-uri", u, "-label", "x"}, "hsmcheck cert import: -in is required"},
		{[]string{"cert", "import", "-uri", u, "-in", "f.pem"}, "hsmcheck cert import: no key"},
		{[]string{"cert", "export", "-uri", u}, "hsmcheck cert export: no key"},
		{[]string{"cert", "export", "-uri", u, "-label", "x", "-in", "f"}, "flag provided but not defined: -in"},
	}
	for _, tt := range tests {
		expect(t, 2, nil, []string{tt.err}, tt.args...)
	}
	// The module is not opened for a usage error, but is for the rest.
	expect(t, 1, nil, []string{"hsmcheck list: ", "no such file"}, "list", "-uri", u)
	// Usage and help name the new commands.
	expect(t, 2, nil, []string{"keygen -uri URI -type TYPE", "list   -uri URI", "delete -uri URI", "cert import -uri URI -in FILE", "cert export -uri URI"})
	expect(t, 0, nil, []string{"-decrypt", "-type"}, "keygen", "-h")
}

// TestKeygenMechanisms: keygen -mechanisms makes a key restricted to the
// mechanisms listed (by name, without CKM_, or by number): it signs
// messages with them (SignMessage), and refuses to sign a digest.
func TestKeygenMechanisms(t *testing.T) {
	tok := softhsmtest.NewToken(t, "hsmcheck-mechs")
	u := "pkcs11:token=" + tok.Label + "?module-path=" + softhsmtest.SoftHSMModule + "&pin-value=" + tok.PIN
	expect(t, 0, []string{`label: "pss"`, "mechanisms: CKM_SHA256_RSA_PKCS_PSS,CKM_SHA384_RSA_PKCS_PSS\n", "-----BEGIN PUBLIC KEY-----"}, nil,
		"keygen", "-uri", u, "-type", "rsa2048", "-label", "pss", "-mechanisms", "CKM_SHA256_RSA_PKCS_PSS, sha384_rsa_pkcs_pss")
	expect(t, 0, []string{"mechanisms: CKM_SHA256_RSA_PKCS\n"}, nil,
		"keygen", "-uri", u, "-type", "rsa2048", "-label", "pkcs1", "-mechanisms", "0x40")
	expect(t, 2, nil, []string{`hsmcheck keygen: -mechanisms: "CKM_SHA256_RSA_PSS" is neither`},
		"keygen", "-uri", u, "-type", "rsa2048", "-label", "x", "-mechanisms", "CKM_SHA256_RSA_PSS")

	p, err := hsm.OpenURI(u, hsm.Config{ProbeInterval: -1, DisableAutoRecovery: true})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	s, err := p.Signer(hsm.KeyRef{Label: "pss"})
	if err != nil {
		t.Fatal(err)
	}
	opts := &rsa.PSSOptions{Hash: crypto.SHA384, SaltLength: rsa.PSSSaltLengthEqualsHash}
	msg := []byte("restricted")
	sig, err := s.SignMessage(nil, msg, opts)
	if err != nil {
		t.Fatal(err)
	}
	d := sha512.Sum384(msg)
	if err := rsa.VerifyPSS(s.Public().(*rsa.PublicKey), crypto.SHA384, d[:], sig, opts); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Sign(nil, d[:], opts); !errors.Is(err, hsm.ErrUnsupportedKey) {
		t.Fatalf("Sign of a digest: %v, want ErrUnsupportedKey", err)
	}
}

// TestKeygenDerive: keygen -derive makes a key-agreement key, which list
// shows as "derive" only; -derive on an RSA key is refused.
func TestKeygenDerive(t *testing.T) {
	tok := softhsmtest.NewToken(t, "hsmcheck-derive")
	u := "pkcs11:token=" + tok.Label + "?module-path=" + softhsmtest.SoftHSMModule + "&pin-value=" + tok.PIN
	expect(t, 0, []string{`label: "kx"`, "type:  ECDSA P-256", "-----BEGIN PUBLIC KEY-----"}, nil,
		"keygen", "-uri", u, "-type", "p256", "-label", "kx", "-derive")
	expect(t, 0, []string{`label: "both"`}, nil,
		"keygen", "-uri", u, "-type", "p384", "-label", "both", "-derive-and-sign")
	out := expect(t, 0, []string{"private keys: 2\n"}, nil, "list", "-uri", u)
	if l := keyLine(out, "private keys", `label "kx"`); !strings.Contains(l, " derive") || strings.Contains(l, "sign") {
		t.Errorf("list shows the key-agreement key as %q, want derive only", l)
	}
	if l := keyLine(out, "private keys", `label "both"`); !strings.Contains(l, "sign,derive") {
		t.Errorf("list shows the derive-and-sign key as %q", l)
	}
	expect(t, 1, nil, []string{"hsmcheck keygen: ", "only EC keys"},
		"keygen", "-uri", u, "-type", "rsa2048", "-label", "r", "-derive")
}
