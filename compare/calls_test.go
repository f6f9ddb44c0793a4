package compare_test

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/rsa"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"

	"github.com/ThalesGroup/crypto11"
	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
	"github.com/miekg/pkcs11"
)

const spyModule = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so"

// spyLog is the log of OpenSC's pkcs11-spy.so, set when the spy is first
// used: the spy reads its settings when it is loaded, once per process.
var spyLog string

// useSpy makes spyModule log to spyLog, in front of SoftHSM.
func useSpy(t *testing.T) {
	t.Helper()
	softhsmtest.Require(t)
	if _, err := os.Stat(spyModule); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("pkcs11-spy.so (package opensc) not installed: %v", err)
		}
		t.Skip("pkcs11-spy.so (package opensc) not installed")
	}
	if spyLog == "" {
		spyLog = filepath.Join(t.TempDir(), "spy.log")
		os.Setenv("PKCS11SPY", softhsmtest.SoftHSMModule)
		os.Setenv("PKCS11SPY_OUTPUT", spyLog)
	}
}

var spyCall = regexp.MustCompile(`(?m)^[0-9]+: C_[A-Za-z]+`)

// countCalls returns how many PKCS#11 calls the spy logged while f ran.
func countCalls(t *testing.T, f func()) int {
	t.Helper()
	before, _ := os.ReadFile(spyLog)
	f()
	after, err := os.ReadFile(spyLog)
	if err != nil {
		t.Fatal(err)
	}
	return len(spyCall.FindAll(after[len(before):], -1))
}

// TestCallsCompared counts, with pkcs11-spy between the caller and
// SoftHSM, the PKCS#11 calls one ECDSA signature costs in raw
// miekg/pkcs11, crypto11 and hsm, and one RSA-2048 decryption in raw
// miekg/pkcs11 and hsm, once sessions are open and the key found (every
// call is a network round trip on a network HSM); make bench writes its
// log into docs/performance.md. The core's TestCallsPerOperation holds hsm to 2.
func TestCallsCompared(t *testing.T) {
	useSpy(t)
	tok := benchToken(t)
	const n = 20
	digest := digest32[:]
	sig := map[string]float64{}
	// Each engine is closed when done, and by t.Cleanup if the test stops
	// early (so that SoftHSM is not left initialized for the next test).
	closeOnce := func(f func()) func() {
		var once sync.Once
		g := func() { once.Do(f) }
		t.Cleanup(g)
		return g
	}
	per := func(f func()) float64 {
		calls := float64(countCalls(t, func() {
			for range n {
				f()
			}
		})) / n
		if calls < 2 {
			t.Fatalf("%.2f calls per operation: the spy did not see them", calls)
		}
		return calls
	}

	p, err := hsm.Open(hsm.Config{Path: spyModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	closeP := closeOnce(func() { p.Close() })
	s, err := p.Signer(hsm.KeyRef{Label: "ec"})
	if err != nil {
		t.Fatal(err)
	}
	_, _ = s.Sign(nil, digest, crypto.SHA256) // open the session
	sig["hsm"] = per(func() {
		if _, err := s.Sign(nil, digest, crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	})
	d, err := p.Decrypter(hsm.KeyRef{Label: "rsa"})
	if err != nil {
		t.Fatal(err)
	}
	pub := d.Public().(*rsa.PublicKey)
	secret := []byte("a session key")
	hsmDec := ""
	for _, c := range []struct {
		name string
		opts crypto.DecrypterOpts
	}{
		{"PKCS#1 v1.5", nil},
		{"OAEP SHA-1: CKM_RSA_PKCS_OAEP", &rsa.OAEPOptions{Hash: crypto.SHA1}},
		{"OAEP SHA-256: CKM_RSA_X_509", &rsa.OAEPOptions{Hash: crypto.SHA256}},
	} {
		ct := encryptTo(t, pub, secret, c.opts)
		decrypt := func() {
			if pt, err := d.Decrypt(nil, ct, c.opts); err != nil || !bytes.Equal(pt, secret) {
				t.Fatalf("%s: %q, %v", c.name, pt, err)
			}
		}
		decrypt() // the first SHA-256 one learns that the token refuses it
		hsmDec += fmt.Sprintf(", %.2f (%s)", per(decrypt), c.name)
	}
	closeP()

	c, err := crypto11.Configure(&crypto11.Config{Path: spyModule, TokenLabel: tok.Label, Pin: tok.PIN})
	if err != nil {
		t.Fatal(err)
	}
	closeC := closeOnce(func() { c.Close() }) // crypto11's Close must not run twice
	cs, err := c.FindKeyPair([]byte{1}, []byte("ec"))
	if err != nil || cs == nil {
		t.Fatalf("crypto11 FindKeyPair: %v", err)
	}
	_, _ = cs.Sign(rand.Reader, digest, crypto.SHA256)
	sig["crypto11"] = per(func() {
		if _, err := cs.Sign(rand.Reader, digest, crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	})
	closeC()

	raw := openRaw(t, spyModule, tok)
	closeR := closeOnce(raw.close)
	sess := raw.session()
	ec, rk := raw.privateKey("ec"), raw.privateKey("rsa")
	sig["raw miekg/pkcs11"] = per(func() {
		if err := raw.ctx.SignInit(sess, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_ECDSA, nil)}, ec); err != nil {
			t.Fatal(err)
		}
		if _, err := raw.ctx.Sign(sess, digest); err != nil {
			t.Fatal(err)
		}
	})
	ct := encryptTo(t, pub, digest, nil)
	rawDec := per(func() {
		if err := raw.ctx.DecryptInit(sess, []*pkcs11.Mechanism{pkcs11.NewMechanism(pkcs11.CKM_RSA_PKCS, nil)}, rk); err != nil {
			t.Fatal(err)
		}
		if pt, err := raw.ctx.Decrypt(sess, ct); err != nil || !bytes.Equal(pt, digest) {
			t.Fatalf("raw decryption: %x, %v", pt, err)
		}
	})
	closeR()

	t.Logf("PKCS#11 calls per ECDSA signature: raw miekg/pkcs11 %.2f, crypto11 %.2f, hsm %.2f (minimum: 2, C_SignInit + C_Sign into a buffer of known size)",
		sig["raw miekg/pkcs11"], sig["crypto11"], sig["hsm"])
	t.Logf("PKCS#11 calls per RSA-2048 decryption: raw miekg/pkcs11 %.2f (PKCS#1 v1.5); hsm%s", rawDec, strings.TrimPrefix(hsmDec, ","))
}
