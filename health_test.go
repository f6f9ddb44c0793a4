package hsm

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"

	"github.com/ce46d8f2/hsm/internal/softhsmtest"
)

// TestAutomaticRecovery: 32 goroutines sign continuously through p11-kit;
// the server's whole process session is killed. Every goroutine sees
// ErrUnavailable, fast; the server is restarted and the provider recovers
// by itself, soon, with exactly one re-initialization per outage; every
// goroutine signs again.
func TestAutomaticRecovery(t *testing.T) {
	r, events := openAuto(t)
	p := r.p
	const workers = 32
	type worker struct {
		signedBefore   atomic.Bool
		sawUnavailable atomic.Bool
		signedAfter    atomic.Bool
	}
	ws := make([]worker, workers)
	var lossAt atomic.Int64    // unix nanos of the first loss seen, 0 before
	var slowest atomic.Int64   // longest call after the loss, nanos
	var recovered atomic.Int64 // unix nanos of the recovery, 0 before
	var bad atomic.Value
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			var s *Signer
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if s == nil {
					var err error
					if s, err = p.Signer(KeyRef{Label: "ec"}); err != nil {
						if !errors.Is(err, ErrUnavailable) && !errors.Is(err, ErrDeviceLost) {
							bad.Store(fmt.Errorf("lookup: %w", err))
						}
						time.Sleep(time.Millisecond)
						continue
					}
				}
				digest := sha256.Sum256(fmt.Appendf(nil, "%d %d", w, i))
				start := time.Now()
				sig, err := s.Sign(nil, digest[:], crypto.SHA256)
				took := time.Since(start)
				if l := lossAt.Load(); l != 0 && start.UnixNano() > l+int64(time.Millisecond) && recovered.Load() == 0 {
					for {
						old := slowest.Load()
						if int64(took) <= old || slowest.CompareAndSwap(old, int64(took)) {
							break
						}
					}
				}
				switch {
				case err == nil:
					if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest[:], sig) {
						bad.Store(errors.New("signature does not verify"))
					}
					ws[w].signedBefore.Store(true)
					if recovered.Load() != 0 && s.Generation() > 1 {
						ws[w].signedAfter.Store(true)
					}
				case errors.Is(err, ErrUnavailable):
					lossAt.CompareAndSwap(0, time.Now().UnixNano())
					ws[w].sawUnavailable.Store(true)
					time.Sleep(time.Millisecond)
				case errors.Is(err, ErrDeviceLost):
					lossAt.CompareAndSwap(0, time.Now().UnixNano())
				case errors.Is(err, ErrStaleKey):
					s = nil
				default:
					bad.Store(fmt.Errorf("unexpected: %w", err))
				}
			}
		})
	}
	defer func() {
		close(stop)
		wg.Wait()
	}()

	every := func(f func(w *worker) bool) func() bool {
		return func() bool {
			for i := range ws {
				if !f(&ws[i]) {
					return false
				}
			}
			return true
		}
	}
	// Every goroutine has a key and signs: each will see the outage in a
	// signature.
	waitFor(t, "every goroutine signed", every(func(w *worker) bool { return w.signedBefore.Load() }))
	killAt := time.Now()
	r.kill(t)
	killTook := time.Since(killAt)
	lost := events.first(t, StateUnavailable, killAt)
	waitFor(t, "every goroutine saw ErrUnavailable", every(func(w *worker) bool { return w.sawUnavailable.Load() }))
	// The HSM stays down until a re-initialization has failed for it.
	waitFor(t, "a re-initialization failed while the HSM was down", func() bool { return p.Stats().ReinitializationFailures > 0 }, p)

	restartAt := time.Now()
	r.restart(t)
	if err := p.WaitHealthy(contextWithTimeout(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	healthy := events.first(t, StateHealthy, restartAt)
	recovered.Store(time.Now().UnixNano())
	waitFor(t, "every goroutine signed again after recovery", every(func(w *worker) bool { return w.signedAfter.Load() }))
	if err, _ := bad.Load().(error); err != nil {
		t.Fatal(err)
	}
	st := p.Stats()
	if st.Reinitializations != 1 || st.Generation != 2 {
		t.Fatalf("%d re-initializations, generation %d; want exactly 1 for one outage", st.Reinitializations, st.Generation)
	}
	slow := time.Duration(slowest.Load())
	t.Logf("kill (SIGKILL to the session, reaped in %v) -> unavailable %v; slowest call while unavailable %v; restart -> healthy %v; failed re-initializations while down %d; errors %v",
		killTook, lost.At.Sub(killAt), slow, healthy.At.Sub(restartAt), st.ReinitializationFailures, st.ErrorsByCode)
	// Failing fast: no PKCS#11 call and no wait. A call that waited would
	// wait for a session (SessionWaitTimeout, 10 s) or for the HSM
	// (ProbeTimeout, 5 s); fastBound (1 s) is far below either.
	if slow > fastBound {
		t.Errorf("a call took %v while the provider was unavailable; they must fail fast (within %v)", slow, fastBound)
	}
	// Recovery: the wait for the next attempt, at most RecoveryBackoffMax,
	// then the attempt, a conversation like Open's, for which
	// remoteProbeTimeout is the margin (see there). A recovery that waited
	// for anything else (the drain, 30 s) would be far above.
	if d, bound := healthy.At.Sub(restartAt), p.cfg.RecoveryBackoffMax+remoteProbeTimeout; d > bound {
		t.Errorf("recovery took %v after the HSM came back, want at most %v", d, bound)
	}

	// A second outage: again exactly one re-initialization.
	killAt = time.Now()
	r.kill(t)
	events.first(t, StateUnavailable, killAt)
	r.restart(t)
	if err := p.WaitHealthy(contextWithTimeout(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	if n := p.Stats().Reinitializations; n != 2 {
		t.Fatalf("%d re-initializations after two outages", n)
	}
}

// TestHungHSMRecovers: the HSM stops answering with a call in flight. The
// watchdog finds it hung and makes the provider unavailable;
// re-initializations time out draining and never finalize under the stuck
// call; when the HSM answers again the call completes and the provider
// recovers by itself.
func TestHungHSMRecovers(t *testing.T) {
	r, events := openAuto(t, func(c *Config) {
		// No periodic probe: a probe that took the only session before
		// the signature would be what hangs, and the signature would fail
		// with ErrUnavailable instead of being the call in flight. The
		// watchdog looks only at calls inside the library.
		c.ProbeInterval = -1
		c.ProbeTimeout = remoteProbeTimeout
		c.DrainTimeout = 300 * time.Millisecond
	})
	p := r.p
	s := mustSigner(t, p, "ec")
	digest := sha256.Sum256([]byte("hung"))
	r.srv.Pause()
	hung := signLater(s, digest[:])
	pausedAt := time.Now()
	in := p.inst.Load()
	waitFor(t, "the signature inside the library", func() bool { return in.calls.Load() > 0 })
	ev := events.first(t, StateUnavailable, pausedAt)
	if !errors.Is(ev.Err, ErrHung) {
		t.Fatalf("unavailable because of %v, want ErrHung", ev.Err)
	}
	// Let a few re-initializations give up on the drain.
	waitFor(t, "two re-initializations gave up while hung", func() bool { return p.Stats().ReinitializationFailures >= 2 }, p)
	p.mod.busy <- struct{}{} // no life cycle call runs: the drain timed out
	finalized := !p.mod.initialized
	<-p.mod.busy
	if finalized || p.Generation() != 1 {
		t.Fatalf("finalized=%v generation=%d with a call in flight", finalized, p.Generation())
	}
	if !errors.Is(p.LastError(), ErrDrainTimeout) && !errors.Is(p.LastError(), ErrHung) {
		t.Fatalf("last error %v", p.LastError())
	}
	_, err := s.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrUnavailable)

	resumeAt := time.Now()
	r.srv.Resume()
	if err := recv(t, "the call in flight, after the HSM answered again", hung); err != nil {
		t.Fatalf("the call in flight: %v", err)
	}
	if err := p.WaitHealthy(contextWithTimeout(t, waitLimit)); err != nil {
		t.Fatal(err)
	}
	healthy := events.first(t, StateHealthy, resumeAt)
	t.Logf("pause -> unavailable %v; resume -> healthy %v; drain time-outs %d", ev.At.Sub(pausedAt), healthy.At.Sub(resumeAt), p.Stats().ReinitializationFailures)
	if _, err := mustSigner(t, p, "ec").Sign(nil, digest[:], crypto.SHA256); err != nil {
		t.Fatal(err)
	}
}

// TestWrongPINAfterOutage: the PIN is changed while the HSM is down. The
// re-initialization's login fails once; the provider latches in StateFailed
// with a clear error and does not retry (retrying would lock the token).
func TestWrongPINAfterOutage(t *testing.T) {
	r, _ := openAuto(t)
	p := r.p
	s := mustSigner(t, p, "ec")
	r.kill(t)
	digest := sha256.Sum256(nil)
	if _, err := s.Sign(nil, digest[:], crypto.SHA256); !errors.Is(err, ErrDeviceLost) {
		t.Fatalf("after kill: %v", err)
	}
	r.tok.ChangePIN(t, "4321") // the provider still has "1234"
	r.restart(t)
	waitState(t, p, StateFailed, 10*time.Second)
	err := p.WaitHealthy(t.Context())
	if !errors.Is(err, ErrPIN) || !errors.Is(p.LastError(), ErrPIN) || !strings.Contains(err.Error(), "CKR_PIN_INCORRECT") ||
		strings.Count(err.Error(), "hsm: ") != 1 {
		t.Fatalf("WaitHealthy: %v; LastError: %v; want a PIN error", err, p.LastError())
	}
	t.Log(err)
	failures := p.Stats().ReinitializationFailures
	// Several backoff periods, in which a retry would show. The sleep
	// waits for something not to happen: a loaded machine can only make
	// it miss a retry, never fail the test falsely.
	time.Sleep(3 * p.cfg.RecoveryBackoffMax)
	if now := p.Stats().ReinitializationFailures; now != failures || p.State() != StateFailed {
		t.Fatalf("re-initialization retried after a PIN error: %d -> %d failures, state %v", failures, now, p.State())
	}
	_, err = s.Sign(nil, digest[:], crypto.SHA256)
	wantErr(t, err, ErrUnavailable)
	// The token is not locked: the new PIN logs in.
	if _, err := r.tok.Tool("--list-objects"); err != nil {
		t.Fatalf("login with the new PIN: %v", err)
	}
}

// TestOtherTokenSameLabel: while the HSM is down the token is replaced by
// another one with the same label. Recovery refuses it.
func TestOtherTokenSameLabel(t *testing.T) {
	r, _ := openAuto(t)
	p := r.p
	oldSerial := r.tok.Serial
	r.kill(t)
	mustSignerOrLost(t, p)
	if err := r.tok.Replace(); err != nil {
		t.Fatal(err)
	}
	if r.tok.Serial == oldSerial {
		t.Fatal("replacement token has the same serial")
	}
	r.restart(t)
	waitState(t, p, StateFailed, 10*time.Second)
	if err := p.LastError(); !errors.Is(err, ErrTokenChanged) || !strings.Contains(err.Error(), oldSerial) {
		t.Fatalf("LastError %v, want ErrTokenChanged naming serial %s", err, oldSerial)
	}
	t.Log(p.LastError())
	_, err := p.Signer(KeyRef{Label: "ec"})
	wantErr(t, err, ErrUnavailable)
}

// TestSuspectCodeProbes: an operation failing with a suspect code makes
// the provider probe the token at once; the token is fine, so it stays
// healthy. The suspect code: signing with a key whose object was destroyed
// (CKR_KEY_HANDLE_INVALID or CKR_OBJECT_HANDLE_INVALID).
func TestSuspectCodeProbes(t *testing.T) {
	tok := softhsmtest.NewToken(t, "suspect")
	tok.GenerateKey(t, softhsmtest.P256, []byte{1}, "doomed")
	p := openToken(t, tok, func(c *Config) { c.ProbeInterval = -1 })
	s := mustSigner(t, p, "doomed")
	err := p.withWriteSession("destroy", func(in *instance, sh pkcs11.SessionHandle) error {
		return in.ctx.DestroyObject(sh, s.k.handle)
	})
	if err != nil {
		t.Fatal(err)
	}
	// Let the probe that the first session of the pool may have started
	// pass, then count.
	quiet(t, p)
	probes := p.Stats().Probes
	d := sha256.Sum256([]byte("x"))
	_, err = s.Sign(nil, d[:], crypto.SHA256)
	if code, _ := codeOf(err); classify(code) != classSuspect {
		t.Fatalf("sign with a destroyed key: %v, class %v; want a suspect code", err, classify(code))
	}
	waitFor(t, "a probe after a suspect code", func() bool { return p.Stats().Probes > probes })
	waitFor(t, "the probe done", func() bool { return !p.health.probing.Load() })
	st := p.Stats()
	if st.State != StateHealthy || st.ProbeFailures != 0 {
		t.Fatalf("after probe: %+v", st)
	}
	code, _ := codeOf(err)
	if st.ErrorsByCode[CodeName(code)] != 1 {
		t.Fatalf("errors by code: %v", st.ErrorsByCode)
	}
}

func TestStatsAndReadiness(t *testing.T) {
	p := openShared(t)
	h := p.ReadyHandler()
	get := func() (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/ready", nil))
		b, _ := io.ReadAll(rec.Body)
		return rec.Code, string(b)
	}
	if code, body := get(); code != http.StatusOK || body != "healthy generation 1\n" {
		t.Fatalf("ready: %d %q", code, body)
	}
	s := mustSigner(t, p, "p256")
	digest := sha256.Sum256(nil)
	for range 5 {
		if _, err := s.Sign(nil, digest[:], crypto.SHA256); err != nil {
			t.Fatal(err)
		}
	}
	if err := p.Reinitialize(t.Context()); err != nil {
		t.Fatal(err)
	}
	_, _ = s.Sign(nil, digest[:], crypto.SHA256) // stale: refused
	st := p.Stats()
	// The lookup, its proof (a signature of a challenge), 5 signatures.
	if st.Operations != 7 || st.Refused != 1 || st.Reinitializations != 1 || st.Generation != 2 || st.State != StateHealthy {
		t.Fatalf("stats %+v", st)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if code, body := get(); code != http.StatusServiceUnavailable || !strings.HasPrefix(body, "closed") {
		t.Fatalf("after close: %d %q", code, body)
	}
}

// TestNoGoroutinesAfterClose: the monitor, the notifier and probes end with
// Close, also after an outage and a recovery.
func TestNoGoroutinesAfterClose(t *testing.T) {
	checkGoroutines(t)
	func() {
		var calls atomic.Int64
		tok := sharedToken(t)
		p, err := Open(Config{Path: softhsmtest.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN,
			ProbeInterval: 5 * time.Millisecond, OnStateChange: func(StateChange) { calls.Add(1) }})
		if err != nil {
			t.Fatal(err)
		}
		if err := p.Reinitialize(t.Context()); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "a probe", func() bool { return p.Stats().Probes > 0 })
		if err := p.Close(); err != nil {
			t.Fatal(err)
		}
		// healthy -> reinitializing -> healthy -> closed
		if calls.Load() != 3 {
			t.Fatalf("%d state changes delivered, want 3", calls.Load())
		}
		if p.Stats().Probes == 0 {
			t.Fatal("no probes ran")
		}
	}()
}

// osThreads returns the number of OS threads of this process.
func osThreads(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if n, ok := strings.CutPrefix(line, "Threads:"); ok {
			v, err := strconv.Atoi(strings.TrimSpace(n))
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
	}
	t.Fatal("no Threads line in /proc/self/status")
	return 0
}

// TestHungHSMBoundsThreads: with the HSM hung, callers beyond MaxSessions
// do not enter the PKCS#11 library (each would pin an OS thread): they
// wait at most SessionWaitTimeout (ErrBusy), or fail at once once the hang
// is detected (ErrUnavailable).
func TestHungHSMBoundsThreads(t *testing.T) {
	r, _ := openAuto(t, func(c *Config) {
		c.SessionWaitTimeout = 100 * time.Millisecond
		// No periodic probe: the one call that hangs is the signature
		// below. The watchdog still finds the hang after ProbeTimeout.
		c.ProbeInterval = -1
		c.ProbeTimeout = remoteProbeTimeout
	})
	p := r.p
	s := mustSigner(t, p, "ec")
	digest := sha256.Sum256(nil)
	r.srv.Pause()
	defer r.srv.Resume()
	go func() { _, _ = s.Sign(nil, digest[:], crypto.SHA256) }() // the one call that hangs
	in := p.inst.Load()
	waitFor(t, "the signature inside the library", func() bool { return in.calls.Load() > 0 })
	before := osThreads(t)

	const callers = 50
	errs := make(chan error, callers)
	start := time.Now()
	for range callers {
		go func() {
			_, err := s.Sign(nil, digest[:], crypto.SHA256)
			errs <- err
		}()
	}
	var busy, unavailable int
	deadline := time.After(waitLimit) // a caller inside the library stays there until Resume
	for range callers {
		var err error
		select {
		case err = <-errs:
		case <-deadline:
			t.Fatalf("callers beyond MaxSessions still blocked after %v; OS threads grew by %d", waitLimit, osThreads(t)-before)
		}
		switch {
		case errors.Is(err, ErrBusy):
			busy++
		case errors.Is(err, ErrUnavailable):
			unavailable++
		default:
			t.Fatalf("caller beyond MaxSessions: %v", err)
		}
	}
	took := time.Since(start)
	grew := osThreads(t) - before
	t.Logf("%d callers beyond the bound: %d ErrBusy, %d ErrUnavailable, all back in %v; OS threads grew by %d", callers, busy, unavailable, took, grew)
	// Each waits at most SessionWaitTimeout, then fails; fastBound is the
	// margin for 50 goroutines on a loaded machine. One that entered the
	// library would be there until the HSM answers (Resume, at the end).
	if bound := p.cfg.SessionWaitTimeout + fastBound; took > bound {
		t.Errorf("callers beyond the bound took %v, want at most %v", took, bound)
	}
	// The runtime may add a thread or two of its own (one to replace the
	// thread the hung call holds); 50 callers in the library would pin 50.
	if grew > 10 {
		t.Errorf("OS threads grew by %d for %d blocked callers: they entered the library", grew, callers)
	}
}
