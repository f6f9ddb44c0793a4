package hsm

// The helpers every test file uses: tokens and providers (direct on
// SoftHSM, or through a p11-kit server as a network HSM), keys, checks of
// signatures and errors, and the one way tests wait (waitFor), with the
// bounds the tests assert. docs/tests.md maps the test files.

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// ---- Bounds ----
//
// A test waits for what must happen by itself (waitFor, waitLimit), and
// asserts speed only where speed is the promise; then the bound is far
// below what the slow path would cost and far above what the machine adds
// when it is busy. The numbers below were measured with -race and both
// cores of a 2-core machine held by busy loops.

// waitLimit bounds every wait for something that must happen by itself: a
// state change, a recovery, workers making progress. It asserts no speed;
// it turns a hang into a failure that says what did not happen. Such waits
// take at most a few seconds (a frozen HSM noticed after the default
// ProbeTimeout, 5 s, is the longest); 30 s is several times that.
const waitLimit = 30 * time.Second

// fastBound is the bound of "fast": an operation that fails without a
// PKCS#11 call, a refusal, a caller woken by an event. Those take
// microseconds; under load the slowest seen was some tens of milliseconds
// (a goroutine waiting for a CPU, a GC). Each test that uses it says what
// the slow path would have cost instead: at least 2 s, so that 1 s tells
// them apart with room on both sides. It is also the slack added to a
// bound that the code meets by a timer (Close after DrainTimeout +
// ProbeTimeout): timers fired late by at most about 20 ms under load.
const fastBound = time.Second

// remoteProbeTimeout is the ProbeTimeout of tests that want a frozen HSM
// behind p11-kit noticed sooner than the default (5 s). ProbeTimeout also
// bounds the provider's longest conversation with a healthy HSM, Open's
// C_Initialize to C_Login (and the same at each re-initialization):
// through p11-kit about 80 ms, at worst 225 ms under load (the 200 ms
// these tests once used failed there); a signature's calls, which the
// watchdog times, at worst 60 ms. 2 s is about nine times the worst: a
// healthy HSM is not taken for a hung one.
const remoteProbeTimeout = 2 * time.Second

// ---- Waiting ----

// changer is something whose changes a wait can wake up on: a Provider
// (changes: its state changed) or an eventLog (a StateChange was
// delivered).
type changer interface{ changes() <-chan struct{} }

// pollEvery is how often waitFor looks at its condition between events.
const pollEvery = 5 * time.Millisecond

// waitFor is the one way tests wait: until cond holds, failing t, with
// what did not happen and the state of the providers in on, when it still
// does not after waitLimit. cond is checked at once, then whenever one of
// on changes, and every pollEvery for what no event announces (counters,
// workers' progress). cond runs in the test's goroutine: it may call
// t.Fatal.
func waitFor(t testing.TB, what string, cond func() bool, on ...changer) {
	t.Helper()
	waitWithin(t, waitLimit, what, cond, on...)
}

// waitState waits until p is in state want: waitFor, bounded by limit.
func waitState(t testing.TB, p *Provider, want State, limit time.Duration) {
	t.Helper()
	waitWithin(t, limit, "state "+want.String(), func() bool { return p.State() == want }, p)
}

func waitWithin(t testing.TB, limit time.Duration, what string, cond func() bool, on ...changer) {
	t.Helper()
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	poll := time.NewTicker(pollEvery)
	defer poll.Stop()
	cases := make([]reflect.SelectCase, 2+len(on))
	cases[0] = reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(deadline.C)}
	cases[1] = reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(poll.C)}
	for {
		// The channels are taken before cond is checked: a change after
		// the check closes them.
		for i, n := range on {
			cases[2+i] = reflect.SelectCase{Dir: reflect.SelectRecv, Chan: reflect.ValueOf(n.changes())}
		}
		if cond() {
			return
		}
		if i, _, _ := reflect.Select(cases); i != 0 {
			continue
		}
		if cond() {
			return
		}
		var states []string
		for _, n := range on {
			if p, ok := n.(*Provider); ok {
				states = append(states, fmt.Sprintf("provider %v, last error %v", p.State(), p.LastError()))
			}
		}
		msg := ""
		if len(states) > 0 {
			msg = " (" + strings.Join(states, "; ") + ")"
		}
		t.Fatalf("not within %v: %s%s", limit, what, msg)
	}
}

// eventLog records the StateChanges delivered to OnStateChange.
type eventLog struct {
	mu      sync.Mutex
	evs     []StateChange
	changed chan struct{} // closed and replaced at every event; nil before the first wait
}

func (l *eventLog) add(ev StateChange) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.evs = append(l.evs, ev)
	if l.changed != nil {
		close(l.changed)
		l.changed = nil
	}
}

// changes returns a channel closed at the next event.
func (l *eventLog) changes() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.changed == nil {
		l.changed = make(chan struct{})
	}
	return l.changed
}

func (l *eventLog) all() []StateChange {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]StateChange(nil), l.evs...)
}

// first waits for the first change to state to at or after since (events
// are delivered asynchronously) and returns it.
func (l *eventLog) first(t *testing.T, to State, since time.Time) StateChange {
	t.Helper()
	var found StateChange
	waitFor(t, fmt.Sprintf("a change to %v since %v delivered to OnStateChange", to, since.Format(time.StampMicro)), func() bool {
		for _, ev := range l.all() {
			if ev.To == to && !ev.At.Before(since) {
				found = ev
				return true
			}
		}
		return false
	}, l)
	return found
}

// within runs f in a goroutine and fails the test if it has not returned
// after limit: the test reports a hang instead of hanging. It returns how
// long f took.
func within(t *testing.T, limit time.Duration, what string, f func()) time.Duration {
	t.Helper()
	done := make(chan struct{})
	start := time.Now()
	go func() {
		defer close(done)
		f()
	}()
	select {
	case <-done:
		return time.Since(start)
	case <-time.After(limit):
		t.Fatalf("%s has not returned after %v", what, limit)
	}
	return 0
}

// recv receives from ch, failing the test, which names what, when nothing
// comes within waitLimit.
func recv[T any](t *testing.T, what string, ch <-chan T) T {
	t.Helper()
	var v T
	within(t, waitLimit, what, func() { v = <-ch })
	return v
}

// quiet waits until the probe that a state change starts has run, so that
// its calls do not land in a count: the monitor has taken its wake-up and
// no probe runs, for calmFor on end (the monitor starts a probe right
// after it takes the wake-up: calmFor is far more than that takes even
// when its thread waits for a CPU).
func quiet(t *testing.T, p *Provider) {
	t.Helper()
	const calmFor = 100 * time.Millisecond
	var calmSince time.Time
	waitFor(t, "the provider stops probing", func() bool {
		if p.health.probing.Load() || len(p.health.kick) > 0 {
			calmSince = time.Time{}
			return false
		}
		if calmSince.IsZero() {
			calmSince = time.Now()
		}
		return time.Since(calmSince) >= calmFor
	}, p)
}

func contextWithTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

// ---- Tokens and providers ----

// The shared token holds one key of every supported type, and two keys
// under one label. Tests that change a token make their own.
var shared struct {
	sync.Mutex
	tok *softhsmtest.Token
}

// Labels and IDs of the shared token's keys.
var sharedKeys = []struct {
	label string
	id    byte
	typ   softhsmtest.KeyType
}{
	{"rsa2048", 1, softhsmtest.RSA2048},
	{"p256", 2, softhsmtest.P256},
	{"p384", 3, softhsmtest.P384},
	{"p521", 4, softhsmtest.P521},
	{"ed25519", 5, softhsmtest.Ed25519},
	{"rsa3072", 6, softhsmtest.RSA3072},
	{"dup", 0x10, softhsmtest.P256},
	{"dup", 0x11, softhsmtest.P256},
}

func sharedToken(t testing.TB) *softhsmtest.Token {
	t.Helper()
	shared.Lock()
	defer shared.Unlock()
	if shared.tok == nil {
		tok := softhsmtest.NewToken(t, "shared")
		for _, k := range sharedKeys {
			tok.GenerateKey(t, k.typ, []byte{k.id}, k.label)
		}
		shared.tok = tok
	}
	return shared.tok
}

// openToken opens a provider on tok (directly on SoftHSM) and closes it when
// the test ends.
func openToken(t testing.TB, tok *softhsmtest.Token, mod ...func(*Config)) *Provider {
	t.Helper()
	cfg := Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN}
	for _, m := range mod {
		m(&cfg)
	}
	p, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open(%v): %v", cfg, err)
	}
	t.Cleanup(func() {
		if err := p.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return p
}

func openShared(t testing.TB, mod ...func(*Config)) *Provider {
	t.Helper()
	return openToken(t, sharedToken(t), mod...)
}

// forEachPath runs f on the shared token twice: with signatures and
// decryptions in two calls through the module's function list
// (fastsign.go), and through miekg/pkcs11's calls, the fallback for a module
// whose list cannot be validated.
func forEachPath(t *testing.T, f func(t *testing.T, p *Provider)) {
	for _, path := range []string{"two-call", "miekg"} {
		t.Run(path, func(t *testing.T) {
			p := openShared(t)
			if p.fast == nil {
				t.Fatal("the two-call path is off for SoftHSM")
			}
			if path == "miekg" {
				p.fast = nil // no operation has run yet
				p.inst.Load().fast = nil
			}
			f(t, p)
		})
	}
}

// remote is a token served by p11-kit server, and a provider that reaches
// it through p11-kit-client.so: every PKCS#11 call is a socket round trip,
// as with a network HSM.
//
// The provider uses one session (MaxSessions 1), so that at most one call is
// inside p11-kit-client.so at a time: p11-kit 0.24.1's client hangs forever
// when the server dies while several threads wait for replies on its one
// socket (rpc_socket_read leaves read_code set when a body read fails, and
// the threads waiting for it to change are never woken). See docs/modules.md,
// "Known module problems".
//
// openRemote's provider re-initializes only when told (DisableAutoRecovery);
// openAuto's recovers by itself.
type remote struct {
	tok *softhsmtest.Token
	srv *softhsmtest.Server
	p   *Provider
}

// openRemote serves a new token with an EC key "ec" (ID 1) and an RSA key
// "rsa" (ID 2) through p11-kit, and opens it with one session and automatic
// recovery off, then mod.
func openRemote(t *testing.T, mod ...func(*Config)) *remote {
	t.Helper()
	tok := softhsmtest.NewToken(t, "remote")
	tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "ec")
	tok.GenerateKey(t, softhsmtest.RSA2048, []byte{2}, "rsa")
	srv := softhsmtest.StartServer(t, tok)
	r := &remote{tok: tok, srv: srv}
	r.p = openToken(t, tok, append([]func(*Config){func(c *Config) {
		c.Path = srv.Module()
		c.MaxSessions = 1
		c.DisableAutoRecovery = true
	}}, mod...)...)
	return r
}

// openAuto is openRemote with automatic recovery on, and the state changes
// recorded.
func openAuto(t *testing.T, mod ...func(*Config)) (*remote, *eventLog) {
	t.Helper()
	ev := &eventLog{}
	r := openRemote(t, append([]func(*Config){func(c *Config) {
		c.DisableAutoRecovery = false
		c.OnStateChange = ev.add
	}}, mod...)...)
	return r, ev
}

// kill kills the server and its connections' processes: the HSM is gone.
func (r *remote) kill(t *testing.T) {
	t.Helper()
	if err := r.srv.Kill(); err != nil {
		t.Fatal(err)
	}
}

// restart starts the server again: the HSM is back.
func (r *remote) restart(t *testing.T) {
	t.Helper()
	if err := r.srv.Restart(); err != nil {
		t.Fatal(err)
	}
}

// ---- Keys ----

func mustSigner(t testing.TB, p *Provider, label string) *Signer {
	t.Helper()
	s, err := p.Signer(KeyRef{Label: label})
	if err != nil {
		t.Fatalf("Signer(%q): %v", label, err)
	}
	return s
}

// mustSignerOrLost makes one call after a kill so that the provider notices.
func mustSignerOrLost(t *testing.T, p *Provider) {
	t.Helper()
	if _, err := p.Signer(KeyRef{Label: "ec"}); !errors.Is(err, ErrDeviceLost) {
		t.Fatalf("lookup after kill: %v, want device lost", err)
	}
}

// signLater signs digest with s in a goroutine and sends the outcome: nil
// for a signature that verifies.
func signLater(s *Signer, digest []byte) <-chan error {
	done := make(chan error, 1)
	go func() {
		sig, err := s.Sign(nil, digest, crypto.SHA256)
		if err == nil && !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest, sig) {
			err = errors.New("the signature does not verify")
		}
		done <- err
	}()
	return done
}

// signInput returns the digest and options to sign msg with s.
func signInput(s *Signer, msg []byte) ([]byte, crypto.SignerOpts) {
	if s.k.kind == kindEd25519 {
		return msg, crypto.Hash(0)
	}
	d := sha256.Sum256(msg)
	return d[:], crypto.SHA256
}

func rsaKey(t testing.TB) *rsa.PrivateKey {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func ecKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// ---- Checks ----

// verify checks sig over digest (or message for Ed25519) with the standard
// library's verifier for pub.
func verify(pub crypto.PublicKey, digest, sig []byte, opts crypto.SignerOpts) error {
	switch pub := pub.(type) {
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			return rsa.VerifyPSS(pub, pss.Hash, digest, sig, pss)
		}
		return rsa.VerifyPKCS1v15(pub, opts.HashFunc(), digest, sig)
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest, sig) {
			return errors.New("ECDSA signature does not verify")
		}
		return nil
	case ed25519.PublicKey:
		if !ed25519.Verify(pub, digest, sig) {
			return errors.New("Ed25519 signature does not verify")
		}
		return nil
	}
	return errors.New("unknown public key type")
}

func hashOf(h crypto.Hash, msg []byte) []byte {
	if h == 0 {
		return msg
	}
	w := h.New()
	w.Write(msg)
	return w.Sum(nil)
}

// encryptTo encrypts secret to pub as a Decrypter with opts (nil, or
// *rsa.OAEPOptions) expects it.
func encryptTo(t testing.TB, pub *rsa.PublicKey, secret []byte, opts crypto.DecrypterOpts) []byte {
	t.Helper()
	var ct []byte
	var err error
	if o, ok := opts.(*rsa.OAEPOptions); ok {
		ct, err = rsa.EncryptOAEPWithOptions(rand.Reader, pub, secret, o)
	} else {
		//lint:ignore SA1019 crypto.Decrypter still defines PKCS #1 v1.5 decryption; tests need its ciphertexts.
		ct, err = rsa.EncryptPKCS1v15(rand.Reader, pub, secret)
	}
	if err != nil {
		t.Fatal(err)
	}
	return ct
}

// wantErr checks that err matches target with errors.Is and is an *Error.
func wantErr(t testing.TB, err, target error) *Error {
	t.Helper()
	if !errors.Is(err, target) {
		t.Fatalf("error = %v, want one matching %v", err, target)
	}
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v (%T) is not an *hsm.Error", err, err)
	}
	return e
}
