package hsm

// Regression tests of a second hostile review of shared modules (after the
// fixes of review_test.go). No sleep orders events: the tests wait for
// states, for goroutines parked on a channel (waitParked), or hold a call
// in a Provider's gate themselves.

import (
	"errors"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// Found in review 2 (high): two drains of one gate lose a wake-up.
//
// gate.exit wakes a drainer through g.wake, a channel of capacity 1, sent
// to once when the count drops to 0. A re-initialization of the module
// drains A's gate (A is in its part) while A has a call in flight; A's
// Close then starts finish, which drains the same gate with no deadline.
// The call returns: one token, two waiters. Whichever gets it returns; the
// other waits on g.wake forever (finish: Background context, nil stop) or
// until its deadline (the re-initialization: ErrDrainTimeout for nothing,
// after DrainTimeout). When finish loses, A's finished never closes: A
// stays in m.provs for ever, the module's last Close does not finalize
// (only(p) is false), and every later Open of the module, once no Provider
// is open, fails with ErrModuleInUse.
//
// Expected: both drains end when the call returns; the re-initialization
// succeeds for B, A's Close ends. Fix: make the wake a broadcast (close a
// channel replaced under a lock, or sync.Cond-like: drain re-checks
// inflight after registering), or have drain poll inflight when woken by
// another drainer (re-send the token after waking: select { case g.wake
// <- struct{}{}: default: } before returning).
func TestReview2TwoDrainsOneWake(t *testing.T) {
	useSpy(t)
	toks := moduleTokens(t, 2)
	const drain = 3 * time.Second
	a := openOn(t, spyModule, toks[0], func(c *Config) { c.DrainTimeout = drain })
	b := openOn(t, spyModule, toks[1], func(c *Config) { c.DrainTimeout = drain })
	// A call of A inside the library (a signature, say).
	if ok, _ := a.gate.enter(a.Generation()); !ok {
		t.Fatal("A refused a call")
	}
	exited := false
	defer func() {
		if !exited {
			a.gate.exit()
		}
	}()
	reinit := make(chan error, 1)
	go func() { reinit <- b.Reinitialize(t.Context()) }()
	waitParked(t, "(*gate).drain", "(*module).reinitialize")
	closed := make(chan error, 1)
	go func() { closed <- a.Close() }()
	waitParked(t, "(*gate).drain", "(*Provider).finish")
	a.gate.exit() // the call returns
	exited = true

	if err := recv(t, "B's Reinitialize", reinit); err != nil {
		t.Errorf("B's Reinitialize, A's call returned well within DrainTimeout: %v", err)
	}
	// Close waits up to DrainTimeout for the drain, then ProbeTimeout for
	// the rest: the call returned at once, the re-initialization is done.
	if err := recv(t, "A's Close", closed); err != nil {
		t.Errorf("A's Close, its one call returned and the re-initialization done: %v (its finish's drain missed the wake-up the re-initialization's drain took)", err)
		// Unstick finish, so that the module is not held for the tests after.
		select {
		case a.gate.wake <- struct{}{}:
		default:
		}
		<-a.finished
	}
}

// Found in review 2 (medium): a Provider closed during its token-only
// recovery keeps its token's use counted for ever, and its old sessions.
//
// The fix for "closed during a re-initialization" added, in the token-only
// branch of module.reinitialize, a check of StateClosed inside the module
// goroutine; but p.inst.Swap(nil) runs before it, and the old instance's
// unuse (and, after CKR_USER_NOT_LOGGED_IN, its closeSessions) comes after
// it. A Close between the state check under life and that check (while
// answersElsewhere probes another Provider, or while the drain waits)
// leaves: p.inst nil (finish has nothing to give back), the old instance's
// use of the token still counted (m.tokens[serial].users stays 1: the
// token is never logged out by its last Provider, in this epoch), and its
// old sessions open
// while other Providers keep the module up. Before the fix, the old
// instance's unuse always ran.
//
// Expected: after A's Close, no use of token A counted, none of A's
// sessions on its slot. Fix: check StateClosed before swapping the
// instance out (return with p.inst untouched), or give the old instance
// back (unuse, closeSessions when loggedOut) before returning errStopped.
func TestReview2CloseDuringTokenOnlyRecovery(t *testing.T) {
	useSpy(t)
	toks := moduleTokens(t, 2)
	a := openOn(t, spyModule, toks[0], func(c *Config) { c.DisableAutoRecovery = true })
	// B has one session slot, and probes slowly enough that a call held
	// in it is not taken for a frozen HSM.
	b := openOn(t, spyModule, toks[1], func(c *Config) { c.MaxSessions = 1; c.ProbeTimeout = waitLimit })
	slot := a.inst.Load().slot

	// B's one slot is taken by a call of B's (a slow signature, say):
	// answersElsewhere's probe of B waits for it.
	gen := b.Generation()
	started, release := make(chan struct{}), make(chan struct{})
	held := make(chan error, 1)
	go func() {
		held <- b.run(gen, newRefusals("test", gen), waitLimit, runOwn, func(*instance, pkcs11.SessionHandle) error {
			close(started)
			<-release
			return nil
		})
	}()
	recv(t, "B's call started", started)
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()

	// Token A loses its login (not its sessions); A's probe sees it.
	loseLogin(t, b, a, slot)

	recovered := make(chan error, 1)
	go func() { recovered <- a.reinitFrom(t.Context(), a.Generation(), true) }() // the monitor's call
	waitParked(t, "(*module).answersElsewhere", "(*module).reinitialize")
	closed := make(chan error, 1)
	go func() { closed <- a.Close() }()
	if !waitClosed(a, waitLimit) {
		t.Fatal("A did not reach StateClosed")
	}
	close(release) // B's call returns; its probe answers: token-only
	released = true
	if err := recv(t, "B's call", held); err != nil {
		t.Fatal(err)
	}
	if err := recv(t, "A's recovery", recovered); !errors.Is(err, ErrClosed) {
		t.Logf("A's recovery: %v", err)
	}
	if err := recv(t, "A's Close", closed); err != nil {
		t.Fatalf("A's Close: %v", err)
	}
	signs(t, mustSigner(t, b, "ec"), "B")

	// A use left with 0 users (a login the next set-up of the token
	// shares) is the design; a use counted for a closed Provider is not.
	if u := moduleTokenUse(t, b.mod, toks[0].Serial); u != nil && u.users != 0 {
		t.Errorf("token A has no Provider left, yet the module still counts %d use of it (never logged out by its last Provider): %+v", u.users, *u)
	}
	if n := sessionsOn(t, b, slot); n != 0 {
		t.Errorf("A, the only Provider of its token, is closed and %d of its sessions are still open on its slot (the module stays up for B); want 0", n)
	}
}
