package hsm

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"os"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

// toolObject is an object as pkcs11-tool -O lists it.
type toolObject struct {
	class, label, id string
	usage            []string
}

// toolObjects lists the key objects of tok with pkcs11-tool, in its own
// process: what another program sees on the token.
func toolObjects(t *testing.T, tok *softhsmtest.Token) []toolObject {
	t.Helper()
	out, err := tok.Tool("--list-objects")
	if err != nil {
		t.Fatal(err)
	}
	var objs []toolObject
	for _, line := range strings.Split(out, "\n") {
		switch {
		case strings.HasPrefix(line, "Public Key Object"):
			objs = append(objs, toolObject{class: "public"})
		case strings.HasPrefix(line, "Private Key Object"):
			objs = append(objs, toolObject{class: "private"})
		case strings.HasPrefix(line, "Certificate Object"):
			objs = append(objs, toolObject{class: "certificate"})
		case len(objs) > 0:
			k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
			if !ok {
				continue
			}
			v = strings.TrimSpace(v)
			o := &objs[len(objs)-1]
			switch k {
			case "label":
				o.label = v
			case "ID":
				o.id = v
			case "Usage":
				for _, u := range strings.Split(v, ",") {
					if u = strings.TrimSpace(u); u != "" && u != "none" {
						o.usage = append(o.usage, u)
					}
				}
				sort.Strings(o.usage)
			}
		}
	}
	return objs
}

// labelled counts the private and public key objects labelled label.
func labelled(objs []toolObject, label string) (privs, pubs int) {
	for _, o := range objs {
		switch {
		case o.label != label:
		case o.class == "private":
			privs++
		case o.class == "public":
			pubs++
		}
	}
	return privs, pubs
}

// TestGenerateKeyLeastPrivilege: a generated signing key can sign and
// verify and nothing else, whatever SoftHSM's defaults (an EC private key
// that unwraps, an RSA public key that encrypts and wraps): every
// capability attribute of both halves is read back, in process and by
// pkcs11-tool. A spec that asks for more gets exactly that.
func TestGenerateKeyLeastPrivilege(t *testing.T) {
	tok := softhsmtest.NewToken(t, "leastpriv")
	p := openToken(t, tok)
	caps := []uint{pkcs11.CKA_SIGN, pkcs11.CKA_VERIFY, pkcs11.CKA_DECRYPT, pkcs11.CKA_ENCRYPT, pkcs11.CKA_UNWRAP, pkcs11.CKA_WRAP, pkcs11.CKA_DERIVE}
	for _, c := range []struct {
		name            string
		spec            KeySpec
		priv, pub       []uint   // the capabilities on, in process
		privUse, pubUse []string // pkcs11-tool's Usage
	}{
		{"RSA-2048", KeySpec{Type: RSA2048}, []uint{pkcs11.CKA_SIGN}, []uint{pkcs11.CKA_VERIFY}, []string{"sign"}, []string{"verify"}},
		{"RSA-3072", KeySpec{Type: RSA3072}, []uint{pkcs11.CKA_SIGN}, []uint{pkcs11.CKA_VERIFY}, []string{"sign"}, []string{"verify"}},
		{"P-256", KeySpec{Type: ECDSAP256}, []uint{pkcs11.CKA_SIGN}, []uint{pkcs11.CKA_VERIFY}, []string{"sign"}, []string{"verify"}},
		{"P-384", KeySpec{Type: ECDSAP384}, []uint{pkcs11.CKA_SIGN}, []uint{pkcs11.CKA_VERIFY}, []string{"sign"}, []string{"verify"}},
		{"P-521", KeySpec{Type: ECDSAP521}, []uint{pkcs11.CKA_SIGN}, []uint{pkcs11.CKA_VERIFY}, []string{"sign"}, []string{"verify"}},
		{"Ed25519", KeySpec{Type: Ed25519}, []uint{pkcs11.CKA_SIGN}, []uint{pkcs11.CKA_VERIFY}, []string{"sign"}, []string{"verify"}},
		{"RSA-2048 decrypting", KeySpec{Type: RSA2048, Decrypt: true},
			[]uint{pkcs11.CKA_SIGN, pkcs11.CKA_DECRYPT}, []uint{pkcs11.CKA_VERIFY, pkcs11.CKA_ENCRYPT}, []string{"decrypt", "sign"}, []string{"encrypt", "verify"}},
		{"P-256 deriving on request", KeySpec{Type: ECDSAP256, PrivateAttributes: []Attribute{{pkcs11.CKA_DERIVE, true}}},
			[]uint{pkcs11.CKA_SIGN, pkcs11.CKA_DERIVE}, []uint{pkcs11.CKA_VERIFY}, []string{"derive", "sign"}, []string{"verify"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			spec := c.spec
			spec.Label = "lp " + c.name
			s, err := p.GenerateKey(spec)
			if err != nil {
				t.Fatal(err)
			}
			err = p.withSession("check", func(in *instance, sh pkcs11.SessionHandle) error {
				pub, err := in.findOne(sh, "check", refTemplate(pkcs11.CKO_PUBLIC_KEY, s.KeyRef().ID, ""), "public key", s.KeyRef())
				if err != nil {
					return err
				}
				for _, half := range []struct {
					h    pkcs11.ObjectHandle
					want []uint
				}{{s.k.handle, c.priv}, {pub, c.pub}} {
					vals, err := in.slowAttrs(sh, half.h, caps)
					if err != nil {
						return err
					}
					for i, a := range caps {
						want := false
						for _, w := range half.want {
							want = want || w == a
						}
						if isTrue(vals[i]) != want {
							t.Errorf("%s half: %s is %v, want %v", map[bool]string{true: "private", false: "public"}[half.h == s.k.handle], attrName(a), isTrue(vals[i]), want)
						}
					}
				}
				return nil
			})
			if err != nil {
				t.Fatal(err)
			}
			id := hex.EncodeToString(s.KeyRef().ID)
			for _, o := range toolObjects(t, tok) {
				if o.id != id {
					continue
				}
				want := map[string][]string{"private": c.privUse, "public": c.pubUse}[o.class]
				if strings.Join(o.usage, ",") != strings.Join(want, ",") {
					t.Errorf("pkcs11-tool: %s half's usage %v, want %v", o.class, o.usage, want)
				}
			}
		})
	}
}

// TestGenerateKeyCutShort: the token dies in the middle of
// C_GenerateKeyPair (its p11-kit server stopped the moment SoftHSM has
// written the first half, then killed). SoftHSM keeps that half alone.
// After recovery the same GenerateKey succeeds and leaves exactly one pair,
// with a given ID and with the computed one. Stopped before any half is
// written, nothing is left and the retry succeeds as well.
func TestGenerateKeyCutShort(t *testing.T) {
	for _, c := range []struct {
		name string
		spec KeySpec
		at   int // the new object file at which the token dies
	}{
		{"EC given ID, after the public half", KeySpec{Type: ECDSAP256, ID: []byte{0xc0, 0x01}}, 2},
		{"EC computed ID, after the public half", KeySpec{Type: ECDSAP256}, 2},
		{"RSA given ID, after the public half", KeySpec{Type: RSA2048, ID: []byte{0xc0, 0x02}}, 2},
		{"RSA computed ID, after the public half", KeySpec{Type: RSA2048}, 2},
		{"EC given ID, before any half", KeySpec{Type: ECDSAP256, ID: []byte{0xc0, 0x03}}, 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			for attempt := 1; ; attempt++ {
				var privs, pubs int
				t.Run(fmt.Sprintf("attempt %d", attempt), func(t *testing.T) { privs, pubs = cutShortOnce(t, c.spec, c.at) })
				if t.Failed() || c.at != 2 || (privs == 0 && pubs == 1) {
					return
				}
				// The trap stopped the server after SoftHSM had written
				// both halves (on a loaded machine its goroutine can be
				// that late): the retry finished the whole pair, as it
				// must. Again, for the lone half this case is about.
				if attempt == 5 {
					t.Fatal("in 5 attempts the token never kept the public half alone: the trap came too late every time")
				}
			}
		})
	}
}

// cutShortOnce kills the token at the at-th new object file of a
// GenerateKey of spec, brings it back, and checks that the retry of the
// same GenerateKey leaves exactly one pair, which signs. It returns the
// private and public halves the dead token had kept.
func cutShortOnce(t *testing.T, spec KeySpec, at int) (privs, pubs int) {
	r := openRemote(t)
	spec.Label = "cut"
	trap, err := r.srv.StopAtObject(at)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := r.p.GenerateKey(spec)
		done <- err
	}()
	// The generation runs until the trap stops the server; then the call
	// waits on the stopped server, and returns once it is killed.
	within(t, 60*time.Second, "the trap", func() {
		for !trap.Fired() {
			select {
			case err := <-done:
				t.Fatalf("GenerateKey returned before the token died: %v", err)
			case <-time.After(time.Millisecond):
			}
		}
	})
	_, files := trap.Close()
	r.kill(t)
	var first error
	within(t, 20*time.Second, "GenerateKey", func() { first = <-done })
	privs, pubs = labelled(toolObjects(t, r.tok), "cut")
	t.Logf("token died after %d new object files: %v; left %d private and %d public key objects", len(files), first, privs, pubs)
	if first == nil {
		// The trap was so late that the whole generation had answered.
		if privs != 1 || pubs != 1 {
			t.Fatalf("GenerateKey succeeded and left %d private and %d public halves", privs, pubs)
		}
		return privs, pubs
	}
	wantErr(t, first, ErrDeviceLost)
	r.restart(t)
	if err := r.p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	s, err := r.p.GenerateKey(spec)
	if err != nil {
		t.Fatalf("the retry: %v", err)
	}
	if objs := toolObjects(t, r.tok); func() bool { privs, pubs := labelled(objs, "cut"); return privs != 1 || pubs != 1 }() {
		privs, pubs := labelled(objs, "cut")
		keys, kerr := r.p.Keys()
		t.Fatalf("after the retry: %d private and %d public halves labelled cut, want one pair; pkcs11-tool lists %+v; Keys: %+v, %v",
			privs, pubs, objs, keys, kerr)
	}
	digest := hashOf(crypto.SHA256, []byte("cut short"))
	sig, err := s.Sign(nil, digest, crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(s.Public(), digest, sig, crypto.SHA256); err != nil {
		t.Fatal(err)
	}
	if _, err := r.p.Signer(KeyRef{Label: "cut"}); err != nil {
		t.Fatalf("the key looked up by its label: %v", err)
	}
	return privs, pubs
}

// TestGenerateKeyLeavesForeignObjects: a public key that this library did
// not make is never deleted for a generation: with a given ID it is
// refused with ErrKeyExists, whose message names the call that removes it
// (DeleteKey, which removes a lone public key when asked by its reference);
// with the computed ID, a cut-short retry leaves a public key under the
// label that was there before it.
func TestGenerateKeyLeavesForeignObjects(t *testing.T) {
	tok := softhsmtest.NewToken(t, "foreign")
	foreign, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(foreign.Public())
	if err != nil {
		t.Fatal(err)
	}
	f := t.TempDir() + "/pub.der"
	if err := os.WriteFile(f, der, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := tok.Tool("--write-object", f, "--type", "pubkey", "--id", "f0", "--label", "verify-only"); err != nil {
		t.Fatal(err)
	}
	p := openToken(t, tok)
	ref := KeyRef{ID: []byte{0xf0}}
	_, err = p.GenerateKey(KeySpec{Type: ECDSAP256, Label: "new", ID: ref.ID})
	wantErr(t, err, ErrKeyExists)
	if !strings.Contains(err.Error(), "DeleteKey") {
		t.Fatalf("the error names no call that deletes the object: %v", err)
	}
	if privs, pubs := labelled(toolObjects(t, tok), "verify-only"); privs != 0 || pubs != 1 {
		t.Fatalf("the foreign public key was touched: %d %d", privs, pubs)
	}
	// A lone public key whose ID a private key has is not lone: never
	// deleted alone.
	tok.GenerateKey(t, softhsmtest.P256, []byte{0xf1}, "pair")
	if _, err := tok.Tool("--write-object", f, "--type", "pubkey", "--id", "f1", "--label", "pair-extra"); err != nil {
		t.Fatal(err)
	}
	wantErr(t, p.DeleteKey(KeyRef{Label: "pair-extra"}), ErrKeyNotFound)
	// Asked by its reference, DeleteKey removes the lone one.
	if err := p.DeleteKey(ref); err != nil {
		t.Fatal(err)
	}
	if privs, pubs := labelled(toolObjects(t, tok), "verify-only"); privs != 0 || pubs != 0 {
		t.Fatalf("after DeleteKey: %d %d", privs, pubs)
	}
	wantErr(t, p.DeleteKey(ref), ErrKeyNotFound)
	if _, err := p.GenerateKey(KeySpec{Type: ECDSAP256, Label: "new", ID: ref.ID}); err != nil {
		t.Fatal(err)
	}
}

// TestImportCertificateParsesRaw: ImportCertificate stores cert.Raw, so
// cert.Raw must parse, and be for the key, whatever cert's other fields
// say; nothing is written otherwise.
func TestImportCertificateParsesRaw(t *testing.T) {
	tok := softhsmtest.NewToken(t, "importraw")
	p := openToken(t, tok)
	s, err := p.GenerateKey(KeySpec{Type: ECDSAP256, Label: "leaf"})
	if err != nil {
		t.Fatal(err)
	}
	other, err := p.GenerateKey(KeySpec{Type: ECDSAP256, Label: "other"})
	if err != nil {
		t.Fatal(err)
	}
	good := selfSigned(t, s, 0)
	otherCert := selfSigned(t, other, 0)
	for _, c := range []struct {
		name string
		raw  []byte
	}{
		{"Raw cut in half", good.Raw[:len(good.Raw)/2]},
		{"Raw of another key's certificate", otherCert.Raw},
		{"Raw an empty SEQUENCE", []byte{0x30, 0x00}},
		{"Raw with trailing data", append(bytes.Clone(good.Raw), 0)},
	} {
		bad := *good
		bad.Raw = c.raw
		err := p.ImportCertificate(s.KeyRef(), &bad)
		wantErr(t, err, ErrInvalidOptions)
		t.Logf("%s: %v", c.name, err)
		_, err = p.Certificate(s.KeyRef())
		wantErr(t, err, ErrKeyNotFound)
	}
	// A chain certificate (no key under ref) must parse too.
	chain := *otherCert
	chain.Raw = []byte{0x30, 0x00}
	wantErr(t, p.ImportCertificate(KeyRef{ID: []byte{0xca}, Label: "ca"}, &chain), ErrInvalidOptions)
	if err := p.ImportCertificate(s.KeyRef(), good); err != nil {
		t.Fatal(err)
	}
	if c, err := p.Certificate(s.KeyRef()); err != nil || !bytes.Equal(c.Raw, good.Raw) {
		t.Fatalf("the good certificate: %v", err)
	}
}

// TestGenerateKeyDefaultsTurnedOff: a module that refuses the capabilities
// off in the template (tpm2-pkcs11 refuses CKA_DECRYPT false) gets the
// template without them; what its defaults then turn on (SoftHSM: an EC
// private key that unwraps, an RSA public key that encrypts and wraps, an
// RSA private key that decrypts and unwraps) is turned off after
// generation, and read back off.
func TestGenerateKeyDefaultsTurnedOff(t *testing.T) {
	tok := softhsmtest.NewToken(t, "defaults")
	p := openToken(t, tok)
	caps := []uint{pkcs11.CKA_DECRYPT, pkcs11.CKA_ENCRYPT, pkcs11.CKA_UNWRAP, pkcs11.CKA_WRAP, pkcs11.CKA_DERIVE}
	for _, typ := range []KeyType{RSA2048, ECDSAP256, Ed25519} {
		spec := KeySpec{Type: typ, Label: "defaults " + typ.String()}
		tmpl, err := spec.templates()
		if err != nil {
			t.Fatal(err)
		}
		tmpl.pubOff, tmpl.privOff = nil, nil // as after the module refused them
		var k *key
		var before [2][][]byte
		err = p.write("generate key", func(in *instance, s pkcs11.SessionHandle) error {
			ph, kh, err := in.generatePair(s, spec, tmpl)
			if err != nil {
				return err
			}
			for i, h := range []pkcs11.ObjectHandle{kh, ph} {
				if before[i], err = in.slowAttrs(s, h, caps); err != nil {
					return err
				}
			}
			k, err = in.finishPair(s, spec, tmpl, ph, kh)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		on := 0
		for _, half := range before {
			for _, v := range half {
				if isTrue(v) {
					on++
				}
			}
		}
		t.Logf("%v: %d capabilities on by the module's defaults", typ, on)
		for _, o := range toolObjects(t, tok) {
			if o.label == spec.Label && strings.Join(o.usage, ",") != map[string]string{"private": "sign", "public": "verify"}[o.class] {
				t.Errorf("%v: pkcs11-tool: %s half's usage %v, want only sign or verify", typ, o.class, o.usage)
			}
		}
		if k == nil {
			t.Fatal("no key")
		}
	}
}
