package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// These tests freeze the "network HSM" with SIGSTOP (softhsmtest's Pause),
// as a stalled network or a hung HSM would: calls into p11-kit-client.so
// then block until SIGCONT. Every wait of the provider must still end.

// waitFinished waits until Close's work is done: the library finalized and
// the module released.
func waitFinished(t *testing.T, p *Provider) {
	t.Helper()
	select {
	case <-p.finished:
	case <-time.After(waitLimit):
		t.Fatalf("the library was not finalized and the module not released %v after the HSM answered again", waitLimit)
	}
}

// wantModuleInUse checks that the module of r is still claimed: Open fails
// with ErrModuleInUse, after waiting its DrainTimeout plus ProbeTimeout
// for the end of the closed Provider.
func wantModuleInUse(t *testing.T, r *remote) {
	t.Helper()
	p, err := Open(Config{Path: r.srv.Module(), TokenLabel: r.tok.Label, PIN: r.tok.PIN,
		DrainTimeout: 200 * time.Millisecond, ProbeTimeout: 300 * time.Millisecond})
	if err == nil {
		p.Close()
		t.Fatal("Open succeeded while a call was still inside the module")
	}
	wantErr(t, err, ErrModuleInUse)
}

// wantModuleFree checks that the module of r can be opened again, and
// signs.
func wantModuleFree(t *testing.T, r *remote) {
	t.Helper()
	p, err := Open(Config{Path: r.srv.Module(), TokenLabel: r.tok.Label, PIN: r.tok.PIN, MaxSessions: 1})
	if err != nil {
		t.Fatalf("Open after the HSM answered again: %v", err)
	}
	defer p.Close()
	d := sha256.Sum256([]byte("again"))
	if _, err := mustSigner(t, p, "ec").Sign(nil, d[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
}

// closeFrozen closes r's provider while the HSM is frozen: Close must
// return within bound, with an error matching want that names says.
func closeFrozen(t *testing.T, r *remote, what string, want error, says string, bound time.Duration) {
	t.Helper()
	var err error
	took := within(t, waitLimit, "Close", func() { err = r.p.Close() })
	t.Logf("Close, %s: %v in %v", what, err, took)
	wantErr(t, err, want)
	if !strings.Contains(err.Error(), says) || took > bound {
		t.Fatalf("Close: %v after %v, want %v naming %q within %v", err, took, want, says, bound)
	}
	wantModuleInUse(t, r)
}

// freezeConfig: bounds short enough for a quick test (ProbeTimeout is
// remoteProbeTimeout: the provider opens through p11-kit), and no periodic
// probe.
func freezeConfig(c *Config) {
	c.ProbeTimeout = remoteProbeTimeout
	c.DrainTimeout = time.Second
	c.ProbeInterval = -1
}

// closeBound is how long Close may take against a frozen HSM with
// freezeConfig: DrainTimeout + ProbeTimeout, its documented bound, plus
// fastBound for the timers and goroutines of a loaded machine. A Close that
// waited for the HSM would not return before Resume, after the check.
const closeBound = time.Second + remoteProbeTimeout + fastBound

// TestCloseWhenFrozen times Close against a frozen HSM in each state the
// provider can be in. Close returns within DrainTimeout + ProbeTimeout and
// says what it left behind; the module stays claimed until the stuck call
// returns, then the library is finalized and the module released.
func TestCloseWhenFrozen(t *testing.T) {
	t.Run("idle", func(t *testing.T) {
		r := openRemote(t, freezeConfig)
		r.srv.Pause()
		closeFrozen(t, r, "idle provider", ErrHung, "C_Logout and C_Finalize", closeBound)
		r.srv.Resume()
		waitFinished(t, r.p)
		if err := r.p.Close(); err != nil {
			t.Fatalf("Close again after the HSM answered: %v", err)
		}
		wantModuleFree(t, r)
	})

	t.Run("call in flight", func(t *testing.T) {
		r := openRemote(t, freezeConfig)
		s := mustSigner(t, r.p, "ec")
		d := sha256.Sum256([]byte("in flight"))
		r.srv.Pause()
		signed := signLater(s, d[:])
		in := r.p.inst.Load()
		waitFor(t, "the signature inside the library", func() bool { return in.calls.Load() > 0 })
		closeFrozen(t, r, "a call in flight", ErrDrainTimeout, "1 calls still inside", closeBound)
		r.srv.Resume()
		if err := recv(t, "the call in flight, after the HSM answered again", signed); err != nil {
			t.Fatalf("the call in flight: %v", err)
		}
		waitFinished(t, r.p)
		wantModuleFree(t, r)
	})

	t.Run("re-initialization stuck in C_Initialize", func(t *testing.T) {
		r := openRemote(t, freezeConfig)
		p := r.p
		r.kill(t)
		r.restart(t)
		r.srv.Pause() // the HSM is back, and frozen: it accepts, never answers
		var err error
		took := within(t, waitLimit, "Reinitialize", func() { err = p.Reinitialize(context.Background()) })
		t.Logf("Reinitialize, HSM frozen: %v in %v", err, took)
		wantErr(t, err, ErrHung)
		st := p.Stats()
		if st.State != StateUnavailable || st.ReinitializationFailures != 1 || !errors.Is(st.LastError, ErrHung) {
			t.Fatalf("after a stuck re-initialization: state %v, %d failures, last error %v", st.State, st.ReinitializationFailures, st.LastError)
		}
		stuck := p.mod.call.Load()
		if stuck == nil || !strings.Contains(stuck.what, "C_Initialize") {
			t.Fatalf("the call left in the module: %+v", stuck)
		}
		// A second attempt fails at once and starts no second
		// C_Finalize/C_Initialize: the stuck call is still the one in the
		// module. One that waited for the stuck call, or started another
		// that hangs, would take ProbeTimeout (2 s); fastBound is 1 s.
		took = within(t, waitLimit, "Reinitialize", func() { err = p.Reinitialize(context.Background()) })
		wantErr(t, err, ErrHung)
		if !strings.Contains(err.Error(), "has not returned") || took > fastBound || p.mod.call.Load() != stuck {
			t.Fatalf("second attempt: %v after %v; want a fast ErrHung and the same call in the module", err, took)
		}
		if p.State() != StateUnavailable || p.Stats().ReinitializationFailures != 2 {
			t.Fatalf("state %v, %d failures", p.State(), p.Stats().ReinitializationFailures)
		}
		closeFrozen(t, r, "re-initialization stuck in C_Initialize", ErrHung, "C_Initialize", closeBound)
		r.srv.Resume()
		waitFinished(t, p)
		wantModuleFree(t, r)
	})

	t.Run("recovery stuck", func(t *testing.T) {
		r := openRemote(t, freezeConfig, func(c *Config) {
			c.DisableAutoRecovery = false
			c.RecoveryBackoffMax = 100 * time.Millisecond
		})
		p := r.p
		s := mustSigner(t, p, "ec")
		d := sha256.Sum256([]byte("x"))
		r.kill(t)
		r.restart(t)
		r.srv.Pause()
		_, err := s.Sign(nil, d[:], crypto.SHA256)
		lostAt := time.Now()
		if !errors.Is(err, ErrDeviceLost) {
			t.Fatalf("sign after the kill: %v", err)
		}
		// Automatic recovery gets stuck in C_Initialize: the attempt fails
		// with ErrHung after ProbeTimeout, and the state is unavailable, not
		// reinitializing without end.
		waitFor(t, "three failed recovery attempts", func() bool { return p.Stats().ReinitializationFailures >= 3 }, p)
		st := p.Stats()
		t.Logf("recovery stuck: %d failed attempts %v after the loss, last error %v", st.ReinitializationFailures, time.Since(lostAt), st.LastError)
		if !errors.Is(st.LastError, ErrHung) || st.Reinitializations != 0 {
			t.Fatalf("last error %v, %d re-initializations", st.LastError, st.Reinitializations)
		}
		waitFor(t, "unavailable between attempts", func() bool { return p.State() == StateUnavailable }, p)
		closeFrozen(t, r, "recovery stuck", ErrHung, "C_Initialize", closeBound)
		r.srv.Resume()
		waitFinished(t, p)
		wantModuleFree(t, r)
	})
}

// TestOpenWhenFrozen: Open against an HSM that accepts the connection and
// never answers fails with ErrHung after ProbeTimeout; the module stays
// claimed until the call returns.
func TestOpenWhenFrozen(t *testing.T) {
	tok := softhsmtest.NewToken(t, "frozen")
	tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "ec")
	srv := softhsmtest.StartServer(t, tok)
	srv.Pause()
	var p *Provider
	var err error
	// The HSM never answers: any ProbeTimeout fails, a short one quickly.
	cfg := Config{Path: srv.Module(), TokenLabel: tok.Label, PIN: tok.PIN, MaxSessions: 1, ProbeTimeout: 500 * time.Millisecond}
	took := within(t, waitLimit, "Open", func() { p, err = Open(cfg) })
	t.Logf("Open, HSM frozen: %v in %v", err, took)
	if p != nil {
		p.Close()
	}
	wantErr(t, err, ErrHung)
	// Open returns at ProbeTimeout; fastBound is the margin for a loaded
	// machine. One that waited for the HSM would not return before Resume.
	if bound := cfg.ProbeTimeout + fastBound; took > bound {
		t.Fatalf("Open took %v, want about ProbeTimeout (%v), at most %v", took, cfg.ProbeTimeout, bound)
	}
	r := &remote{tok: tok, srv: srv}
	wantModuleInUse(t, r)
	srv.Resume()
	// The HSM answers again: Open works once the stuck call has returned
	// and the library is finalized, with a ProbeTimeout a healthy HSM
	// always meets.
	cfg.ProbeTimeout = remoteProbeTimeout
	waitFor(t, "Open after the HSM answered again", func() bool {
		p, err := Open(cfg)
		if err == nil {
			p.Close()
			return true
		}
		if !errors.Is(err, ErrModuleInUse) {
			t.Fatalf("Open after the HSM answered again: %v", err)
		}
		return false
	})
}

// TestFrozenUnderLoad: 64 goroutines sign through 32 sessions; the HSM
// freezes. With the default ProbeTimeout (5s) the provider is unavailable
// within ProbeTimeout and a look of the watchdog, and the goroutines
// waiting for a session fail at once then, with ErrUnavailable, instead of waiting for
// SessionWaitTimeout. When the HSM answers again the provider recovers by
// itself, and every signature returned verifies.
func TestFrozenUnderLoad(t *testing.T) {
	events := &eventLog{}
	r := openRemote(t, func(c *Config) {
		c.MaxSessions = 32
		c.DisableAutoRecovery = false
		c.OnStateChange = events.add
	})
	p := r.p
	if p.cfg.ProbeTimeout != DefaultProbeTimeout || p.cfg.SessionWaitTimeout != DefaultSessionWaitTimeout {
		t.Fatal("not the default settings")
	}
	pub := mustSigner(t, p, "ec").Public().(*ecdsa.PublicKey)
	const workers = 64
	var (
		stop     atomic.Bool
		frozen   atomic.Bool
		failedAt [workers]atomic.Int64 // each worker's first ErrUnavailable after the freeze
		wrong    atomic.Int64
		signed   atomic.Int64
		wg       sync.WaitGroup
	)
	for w := range workers {
		wg.Go(func() {
			var s *Signer
			for i := 0; !stop.Load(); i++ {
				if s == nil {
					var err error
					if s, err = p.Signer(KeyRef{Label: "ec"}); err != nil {
						s = nil
						time.Sleep(5 * time.Millisecond)
						continue
					}
				}
				d := sha256.Sum256([]byte{byte(w), byte(i), byte(i >> 8)})
				sig, err := s.Sign(nil, d[:], crypto.SHA256)
				switch {
				case err == nil:
					signed.Add(1)
					if !ecdsa.VerifyASN1(pub, d[:], sig) {
						wrong.Add(1)
					}
				case errors.Is(err, ErrStaleKey):
					s = nil
				case errors.Is(err, ErrUnavailable):
					if frozen.Load() {
						failedAt[w].CompareAndSwap(0, time.Now().UnixNano())
					}
					time.Sleep(5 * time.Millisecond)
				default:
					t.Errorf("worker %d: %v", w, err)
					return
				}
			}
		})
	}
	waitFor(t, "500 signatures before the freeze", func() bool { return signed.Load() >= 500 })
	pausedAt := time.Now()
	frozen.Store(true)
	r.srv.Pause()
	ev := events.first(t, StateUnavailable, pausedAt)
	detect := ev.At.Sub(pausedAt)
	// The workers that were waiting for a session fail at once; those
	// inside the library (32, one per session) stay there until the HSM
	// answers.
	failed := func() int {
		n := 0
		for w := range workers {
			if failedAt[w].Load() != 0 {
				n++
			}
		}
		return n
	}
	waitFor(t, fmt.Sprintf("the %d workers waiting for a session failed", workers-32), func() bool { return failed() >= workers-32 })
	slowest := time.Duration(0)
	for w := range workers {
		if at := failedAt[w].Load(); at != 0 {
			slowest = max(slowest, time.Unix(0, at).Sub(ev.At))
		}
	}
	t.Logf("freeze under load: unavailable %v after the freeze (%v); then %d workers failed with ErrUnavailable, the last %v after", detect, ev.Err, failed(), slowest)
	// The watchdog decides after ProbeTimeout without progress, and looks
	// every watchEvery (500 ms here); fastBound is the margin for a loaded
	// machine.
	if bound := DefaultProbeTimeout + p.watchEvery() + fastBound; detect > bound {
		t.Errorf("the freeze was noticed after %v, want at most ProbeTimeout + watchEvery + %v = %v", detect, fastBound, bound)
	}
	if !errors.Is(ev.Err, ErrHung) {
		t.Errorf("unavailable because of %v, want ErrHung", ev.Err)
	}
	// At once: without the wake-up they would wait SessionWaitTimeout
	// (10 s); fastBound is far below.
	if slowest > fastBound {
		t.Errorf("the last of the workers waiting for a session failed %v after the detection; want at once (within %v)", slowest, fastBound)
	}
	frozen.Store(false)
	r.srv.Resume()
	if err := p.WaitHealthy(contextWithTimeout(t, waitLimit)); err != nil {
		t.Fatal(err)
	}
	// The calls of the old generation all returned before the recovery
	// finalized the library: what is signed from here on is signed anew.
	again := signed.Load()
	waitFor(t, "100 signatures after the recovery", func() bool { return signed.Load() >= again+100 })
	stop.Store(true)
	wg.Wait()
	if wrong.Load() != 0 {
		t.Fatalf("%d signatures do not verify", wrong.Load())
	}
	if p.Stats().Reinitializations != 1 {
		t.Errorf("%d re-initializations for one freeze", p.Stats().Reinitializations)
	}
}

// TestRestartWithoutToken: the HSM comes back without the token. The
// re-initialization says the token is not present (p11-kit's client answers
// an empty slot list with CKR_BUFFER_TOO_SMALL, which must not show), and
// so does Open.
func TestRestartWithoutToken(t *testing.T) {
	r := openRemote(t)
	r.srv.Stop()
	gone := &softhsmtest.Token{Label: "no-such-token"}
	softhsmtest.StartServer(t, gone)
	err := r.p.Reinitialize(context.Background())
	wantErr(t, err, ErrTokenNotFound)
	if !strings.Contains(err.Error(), "token not present") || strings.Contains(err.Error(), "BUFFER_TOO_SMALL") {
		t.Fatalf("re-initialization without the token: %v", err)
	}
	t.Log(err)
	// A second Provider of the module, open meanwhile, finds no token
	// either, and leaves r.p as it was.
	_, err = Open(Config{Path: softhsmtest.ClientModule, TokenLabel: "x", PIN: "1234"})
	wantErr(t, err, ErrTokenNotFound)
	if st := r.p.State(); st != StateUnavailable {
		t.Fatalf("the first Provider is %v after a second Open failed, want unavailable", st)
	}
	if err := r.p.Close(); err != nil {
		t.Fatal(err)
	}
	_, err = Open(Config{Path: softhsmtest.ClientModule, TokenLabel: "x", PIN: "1234"})
	wantErr(t, err, ErrTokenNotFound)
	if !strings.Contains(err.Error(), "token not present") {
		t.Fatalf("Open without the token: %v", err)
	}
}

// TestCloseFromCallback: OnStateChange may call the provider, Close
// included. Close returns from inside the callback (without waiting for
// the callback, its caller), the provider is closed, and the module is
// free again.
func TestCloseFromCallback(t *testing.T) {
	tok := sharedToken(t)
	closed := make(chan error, 1)
	var p *Provider
	var once sync.Once
	var err error
	p, err = Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN,
		OnStateChange: func(c StateChange) {
			if c.To == StateReinitializing {
				once.Do(func() { closed <- p.Close() })
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	var rerr error
	within(t, waitLimit, "Reinitialize", func() { rerr = p.Reinitialize(context.Background()) })
	select {
	case err := <-closed:
		if err != nil {
			t.Fatalf("Close from the callback: %v", err)
		}
	case <-time.After(waitLimit):
		t.Fatalf("Close from inside OnStateChange has not returned after %v", waitLimit)
	}
	if rerr != nil && !errors.Is(rerr, ErrClosed) {
		t.Fatalf("Reinitialize: %v", rerr)
	}
	var cerr error
	within(t, waitLimit, "Close", func() { cerr = p.Close() })
	if cerr != nil || p.State() != StateClosed {
		t.Fatalf("Close again: %v, state %v", cerr, p.State())
	}
	openShared(t) // the module is free
}

// TestReinitializeFromCallback: the callback calls Reinitialize while
// another goroutine calls Close; both return, whichever wins.
func TestReinitializeFromCallback(t *testing.T) {
	tok := sharedToken(t)
	results := make(chan error, 8)
	var p *Provider
	var calls, sent atomic.Int32
	var err error
	p, err = Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN,
		OnStateChange: func(c StateChange) {
			if c.To == StateHealthy && calls.Add(1) <= 3 {
				// Starts the next re-initialization from inside the callback.
				err := p.Reinitialize(context.Background())
				sent.Add(1)
				results <- err
			}
		}})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Reinitialize(context.Background()); err != nil {
		t.Fatal(err)
	}
	// Close while the callback re-initializes (or is about to).
	waitFor(t, "the callback called for the recovery", func() bool { return calls.Load() > 0 })
	var cerr error
	within(t, waitLimit, "Close", func() { cerr = p.Close() })
	if cerr != nil {
		t.Fatalf("Close: %v", cerr)
	}
	if sent.Load() == 0 {
		t.Fatal("the callback never called Reinitialize: the test tested nothing")
	}
	for n := sent.Load(); n > 0; n-- { // final: Close waited for the callback
		select {
		case err := <-results:
			if err != nil && !errors.Is(err, ErrClosed) {
				t.Fatalf("Reinitialize from the callback: %v", err)
			}
		case <-time.After(waitLimit):
			t.Fatal("Reinitialize from inside OnStateChange has not returned")
		}
	}
	t.Logf("%d re-initializations from the callback before Close", p.Stats().Reinitializations-1)
	openShared(t)
}
