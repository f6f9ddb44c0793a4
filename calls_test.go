package hsm

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"os"
	"path/filepath"
	"regexp"
	"sync"
	"testing"

	"github.com/ThalesGroup/crypto11"
	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

const spyModule = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so"

// spyLog is the log of OpenSC's pkcs11-spy.so, which the spy names when it
// is loaded (once per process).
var spyLog string

// countCalls returns how many PKCS#11 calls the spy logged while f ran.
func countCalls(t *testing.T, f func()) int {
	t.Helper()
	before, _ := os.ReadFile(spyLog)
	f()
	after, err := os.ReadFile(spyLog)
	if err != nil {
		t.Fatal(err)
	}
	return len(regexp.MustCompile(`(?m)^[0-9]+: C_`).FindAll(after[len(before):], -1))
}

// TestCallsPerOperation counts, with pkcs11-spy between the caller and
// SoftHSM, the PKCS#11 calls one ECDSA signature costs in raw
// miekg/pkcs11, crypto11 and hsm, once sessions are open and the key found.
// Every call is a network round trip on a network HSM.
func TestCallsPerOperation(t *testing.T) {
	softhsmtest.Require(t)
	if _, err := os.Stat(spyModule); err != nil {
		t.Skip("pkcs11-spy.so (package opensc) not installed")
	}
	if spyLog == "" {
		spyLog = filepath.Join(t.TempDir(), "spy.log")
		os.Setenv("PKCS11SPY", softhsmtest.SoftHSMModule)
		os.Setenv("PKCS11SPY_OUTPUT", spyLog)
	}
	tok := sharedToken(t)
	const n = 20
	digest := digest32[:]
	per := map[string]float64{}

	// Each engine is closed when done, and by t.Cleanup if the test stops
	// early (so that SoftHSM is not left initialized for the next test).
	closeOnce := func(f func()) func() {
		var once sync.Once
		g := func() { once.Do(f) }
		t.Cleanup(g)
		return g
	}
	p, err := Open(Config{Path: spyModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	closeP := closeOnce(func() { p.Close() })
	if p.fast == nil {
		t.Fatal("the two-call signing path is off for pkcs11-spy.so")
	}
	s := mustSigner(t, p, "p256")
	_, _ = s.Sign(nil, digest, crypto.SHA256) // open the session
	per["hsm"] = float64(countCalls(t, func() {
		for range n {
			if _, err := s.Sign(nil, digest, crypto.SHA256); err != nil {
				t.Fatal(err)
			}
		}
	})) / n
	closeP()

	c, err := crypto11.Configure(&crypto11.Config{Path: spyModule, TokenLabel: tok.Label, Pin: tok.PIN})
	if err != nil {
		t.Fatal(err)
	}
	closeC := closeOnce(func() { c.Close() }) // crypto11's Close must not run twice
	cs, err := c.FindKeyPair([]byte{2}, []byte("p256"))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = cs.Sign(rand.Reader, digest, crypto.SHA256)
	per["crypto11"] = float64(countCalls(t, func() {
		for range n {
			if _, err := cs.Sign(rand.Reader, digest, crypto.SHA256); err != nil {
				t.Fatal(err)
			}
		}
	})) / n
	closeC()

	raw := openRawT(t, spyModule, tok, "p256")
	closeR := closeOnce(raw.close)
	mech := benchMechs()[0].mech()
	sess := raw.session()
	per["raw miekg/pkcs11"] = float64(countCalls(t, func() {
		for range n {
			if err := raw.ctx.SignInit(sess, mech, raw.key); err != nil {
				t.Fatal(err)
			}
			if _, err := raw.ctx.Sign(sess, digest); err != nil {
				t.Fatal(err)
			}
		}
	})) / n
	closeR()

	t.Logf("PKCS#11 calls per ECDSA signature: raw miekg/pkcs11 %.2f, crypto11 %.2f, hsm %.2f (minimum: 2, C_SignInit + C_Sign into a buffer of known size)",
		per["raw miekg/pkcs11"], per["crypto11"], per["hsm"])
	if per["hsm"] != 2 {
		t.Errorf("hsm makes %.2f calls per signature, want the minimum, 2", per["hsm"])
	}
	if log, _ := os.ReadFile(spyLog); !bytes.Contains(log, []byte("C_Sign")) {
		t.Fatal("the spy logged no C_Sign: the count measured nothing")
	}
}
