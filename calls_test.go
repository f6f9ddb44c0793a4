package hsm

import (
	"bytes"
	"crypto"
	"crypto/rsa"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

const spyModule = "/usr/lib/x86_64-linux-gnu/pkcs11/pkcs11-spy.so"

// spyLog is the log of OpenSC's pkcs11-spy.so, which the spy names when it
// is loaded (once per process).
var spyLog string

// useSpy makes spyModule log to spyLog, in front of SoftHSM. The spy reads
// its settings when it is loaded, once per process.
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
		dir, err := os.MkdirTemp("", "hsm-spy-")
		if err != nil {
			t.Fatal(err)
		}
		spyLog = filepath.Join(dir, "spy.log")
		os.Setenv("PKCS11SPY", softhsmtest.SoftHSMModule)
		os.Setenv("PKCS11SPY_OUTPUT", spyLog)
	}
}

// openSpy opens the shared token through pkcs11-spy, without periodic
// probes (their calls would land in the counts), and closes it when the
// test ends.
func openSpy(t *testing.T, mod ...func(*Config)) *Provider {
	t.Helper()
	useSpy(t)
	tok := sharedToken(t)
	cfg := Config{Path: spyModule, TokenLabel: tok.Label, PIN: tok.PIN, ProbeInterval: -1}
	for _, m := range mod {
		m(&cfg)
	}
	p, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return p
}

// countCalls returns how many PKCS#11 calls the spy logged while f ran.
func countCalls(t *testing.T, f func()) int {
	t.Helper()
	n := 0
	for _, c := range callsByName(t, f) {
		n += c
	}
	return n
}

var spyCall = regexp.MustCompile(`(?m)^[0-9]+: (C_[A-Za-z]+)`)

// spyWindow returns what the spy logged while f ran.
func spyWindow(t *testing.T, f func()) []byte {
	t.Helper()
	before, _ := os.ReadFile(spyLog)
	f()
	after, err := os.ReadFile(spyLog)
	if err != nil {
		t.Fatal(err)
	}
	return after[len(before):]
}

// callsByName returns the PKCS#11 calls the spy logged while f ran, by
// function name.
func callsByName(t *testing.T, f func()) map[string]int {
	t.Helper()
	calls := map[string]int{}
	for _, m := range spyCall.FindAllSubmatch(spyWindow(t, f), -1) {
		calls[string(m[1])]++
	}
	return calls
}

// TestCallsPerOperation counts, with pkcs11-spy between hsm and SoftHSM,
// the PKCS#11 calls of one ECDSA signature (Sign, SignMessage) and of one RSA-2048 decryption
// of each kind, once the session is open and the key found: 2 each (every
// call is a network round trip on a network HSM). The compare module's
// TestCallsCompared counts the same for raw miekg/pkcs11 and crypto11.
func TestCallsPerOperation(t *testing.T) {
	p := openSpy(t)
	if p.fast == nil {
		t.Fatal("the two-call signing path is off for pkcs11-spy.so")
	}
	const n = 20
	digest := digest32[:]
	s := mustSigner(t, p, "p256")
	_, _ = s.Sign(nil, digest, crypto.SHA256) // open the session
	perSig := float64(countCalls(t, func() {
		for range n {
			if _, err := s.Sign(nil, digest, crypto.SHA256); err != nil {
				t.Fatal(err)
			}
		}
	})) / n
	t.Logf("PKCS#11 calls per ECDSA signature: %.2f", perSig)
	if perSig != 2 {
		t.Errorf("hsm makes %.2f calls per signature, want the minimum, 2 (C_SignInit + C_Sign into a buffer of known size)", perSig)
	}
	// SignMessage hashes here and signs as Sign does (a key restricted to
	// the token's hash-and-sign mechanisms: TestSignMessageMechanism).
	msg := []byte("benchmark")
	perMsg := float64(countCalls(t, func() {
		for range n {
			if _, err := s.SignMessage(nil, msg, crypto.SHA256); err != nil {
				t.Fatal(err)
			}
		}
	})) / n
	t.Logf("PKCS#11 calls per ECDSA SignMessage: %.2f", perMsg)
	if perMsg != 2 {
		t.Errorf("hsm makes %.2f calls per SignMessage, want 2", perMsg)
	}
	perDec := countDecryptCalls(t, p, n)
	for _, name := range decryptions {
		t.Logf("PKCS#11 calls per RSA-2048 decryption, %s: %.2f", name, perDec[name])
		if perDec[name] != 2 {
			t.Errorf("hsm makes %.2f calls per %s decryption, want 2 (C_DecryptInit + C_Decrypt into a modulus-sized buffer)", perDec[name], name)
		}
	}
	if log, _ := os.ReadFile(spyLog); !bytes.Contains(log, []byte("C_Sign")) || !bytes.Contains(log, []byte("C_Decrypt")) {
		t.Fatal("the spy logged no C_Sign or no C_Decrypt: the count measured nothing")
	}
}

// decryptions names the cases of countDecryptCalls, in its order.
var decryptions = []string{"PKCS#1 v1.5", "OAEP SHA-1: CKM_RSA_PKCS_OAEP", "OAEP SHA-256: CKM_RSA_X_509"}

// countDecryptCalls counts the PKCS#11 calls of n decryptions by p's
// rsa2048 key, for PKCS#1 v1.5, OAEP the token does (SHA-1), and OAEP the
// token refuses (SHA-256, done as CKM_RSA_X_509 and decoded here).
func countDecryptCalls(t *testing.T, p *Provider, n float64) map[string]float64 {
	t.Helper()
	d, err := p.Decrypter(KeyRef{Label: "rsa2048"})
	if err != nil {
		t.Fatal(err)
	}
	pub := d.Public().(*rsa.PublicKey)
	secret := []byte("a session key")
	per := map[string]float64{}
	for i, opts := range []crypto.DecrypterOpts{nil, &rsa.OAEPOptions{Hash: crypto.SHA1}, &rsa.OAEPOptions{Hash: crypto.SHA256}} {
		name := decryptions[i]
		ct := encryptTo(t, pub, secret, opts)
		decrypt := func() {
			if pt, err := d.Decrypt(nil, ct, opts); err != nil || !bytes.Equal(pt, secret) {
				t.Fatalf("%s: %q, %v", name, pt, err)
			}
		}
		decrypt() // the first SHA-256 one learns that the token refuses it
		per[name] = float64(countCalls(t, func() {
			for range int(n) {
				decrypt()
			}
		})) / n
	}
	return per
}

// TestCallsPerLookup counts, with pkcs11-spy, the PKCS#11 calls of a key
// lookup, of a durable key's re-binding after a re-initialization, and of
// Keys: one find (three calls) and one attribute read per object.
func TestCallsPerLookup(t *testing.T) {
	p := openSpy(t)
	if _, err := p.Signer(KeyRef{Label: "p256"}); err != nil { // the pool has a session now
		t.Fatal(err)
	}
	// An EC or Ed25519 key's public key comes from its public key object:
	// the lookup proves the private key with one signature of a challenge
	// (C_SignInit, C_Sign). An RSA key's comes from its private key object.
	for _, c := range []struct {
		label  string
		proofs int
	}{{"p256", 1}, {"ed25519", 1}, {"rsa2048", 0}} {
		calls := callsByName(t, func() {
			if _, err := p.Signer(KeyRef{Label: c.label}); err != nil {
				t.Fatal(err)
			}
		})
		n := total(calls)
		t.Logf("Signer(%q): %d calls %v", c.label, n, calls)
		if n > 5+2*c.proofs || calls["C_FindObjectsInit"] != 1 || calls["C_Sign"] != c.proofs {
			t.Errorf("Signer(%q): %d calls, %d finds, %d signatures; want at most %d (one find, one read of each half, %d proofs)",
				c.label, n, calls["C_FindObjectsInit"], calls["C_Sign"], 5+2*c.proofs, c.proofs)
		}
	}

	ds, err := p.DurableSigner(KeyRef{Label: "p256"})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	quiet(t, p)
	d := digest32[:]
	calls := callsByName(t, func() {
		if _, err := ds.Sign(nil, d, crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	})
	// The re-binding with its proof, the session the new generation opens,
	// the signature.
	rebind := total(calls) - calls["C_OpenSession"] - 2
	t.Logf("durable re-bind after a re-initialization: %d calls (%v in all, with C_OpenSession and the signature)", rebind, calls)
	if rebind > 7 || calls["C_FindObjectsInit"] != 1 || calls["C_Sign"] != 2 {
		t.Errorf("re-bind: %d calls, %d finds, %d signatures; want at most 7, one find, the proof's signature and the caller's", rebind, calls["C_FindObjectsInit"], calls["C_Sign"])
	}

	// A module whose partial attribute reads cannot be trusted (NSS): one
	// read for the class, one for the attributes of the class, one for the
	// public parts, per object.
	p.inst.Load().strictAttrs.Store(true)
	calls = callsByName(t, func() {
		s, err := p.Signer(KeyRef{Label: "p256"})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Sign(nil, d, crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("Signer(\"p256\") reading only what each object has: %d calls %v (with the signature)", total(calls)-2, calls)
	if n := total(calls) - 2; n > 11 || calls["C_FindObjectsInit"] != 1 {
		t.Errorf("strict lookup: %d calls, %d finds; want at most 11 (with the proof's two), one find", n, calls["C_FindObjectsInit"])
	}
	p.inst.Load().strictAttrs.Store(false)

	var keys []KeyInfo
	calls = callsByName(t, func() {
		if keys, err = p.Keys(); err != nil {
			t.Fatal(err)
		}
	})
	t.Logf("Keys() of %d keys: %d calls %v", len(keys), total(calls), calls)
	if want := 6 + 2*len(keys); total(calls) > want || calls["C_FindObjectsInit"] != 2 {
		t.Errorf("Keys(): %d calls, %d finds for %d keys; want at most %d, two finds", total(calls), calls["C_FindObjectsInit"], len(keys), want)
	}
}

func total(calls map[string]int) int {
	n := 0
	for _, c := range calls {
		n += c
	}
	return n
}
