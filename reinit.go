package hsm

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/miekg/pkcs11"
)

// Reinitialize re-initializes the PKCS#11 module: it stops admitting
// operations (they fail fast with ErrUnavailable), waits up to
// Config.DrainTimeout for calls in flight, calls C_Finalize and
// C_Initialize, finds the token again by its selector (it must have the same
// serial number as at Open), logs in and moves to the next generation. Keys
// of earlier generations then fail with ErrStaleKey; look them up again.
//
// The module is the unit of C_Initialize and C_Finalize: when other
// Providers of the process use it (other tokens of it, or the same token),
// it is re-initialized for all of them at once, with this Provider's
// DrainTimeout and ProbeTimeout. The calls of every one of them are
// drained, C_Finalize and C_Initialize are called once, every token is
// logged in again, and every one of them moves to its next generation, so
// that no key of any of them reaches a handle of before (a Provider in
// StateFailed takes part only when it asks). Each gets its own state
// changes; one whose token is not found again becomes unavailable while
// the others come back.
//
// Concurrent calls share one re-initialization, across the Providers of the
// module. A call made while the provider is already past the generation it
// was in when the call began returns nil at once, so a stampede of callers
// that all saw the same outage causes one re-initialization. Callers that
// know which generation failed should use ReinitializeFrom.
//
// If calls are still in flight after DrainTimeout, it returns an error
// wrapping ErrDrainTimeout and does not finalize. If C_Finalize, or
// C_Initialize to C_Login, does not return within Config.ProbeTimeout (a
// frozen HSM), it returns an error wrapping ErrHung, and later attempts fail
// at once with ErrHung until that call has returned: no second C_Finalize
// or C_Initialize enters the module meanwhile. If the HSM is still down, it
// returns the error. In each case the provider stays unavailable and a later
// call may succeed. It never waits longer than DrainTimeout plus twice
// ProbeTimeout (the wait for another Provider's Open or Close of the module
// counts in DrainTimeout; a caller that joins a re-initialization another
// Provider began with longer bounds stops waiting at its own, with
// ErrUnavailable, and the re-initialization goes on), and the Close of the
// module's last open Provider interrupts it (ErrClosed).
//
// It may be called from inside Config.OnStateChange.
//
// ctx bounds how long this caller waits; it does not cancel the shared
// re-initialization, which other callers may be waiting for.
func (p *Provider) Reinitialize(ctx context.Context) error {
	return p.ReinitializeFrom(ctx, p.Generation())
}

// ReinitializeFrom re-initializes the module if the provider is still in
// generation failed, the generation in which the caller saw an operation
// fail (see Error.Generation). If the provider has already moved past
// failed, it returns nil without doing anything. Otherwise it behaves as
// Reinitialize.
func (p *Provider) ReinitializeFrom(ctx context.Context, failed uint64) error {
	return p.reinitFrom(ctx, failed, false)
}

// outcome is what a re-initialization did for each Provider that took part.
type outcome map[*Provider]error

// reinitFrom is ReinitializeFrom. With auto (automatic recovery), a loss
// that the codes say is the token's alone (tokenScoped), while another
// Provider of the module answers, re-opens only this Provider's token,
// without C_Finalize (see module.reinitialize).
func (p *Provider) reinitFrom(ctx context.Context, failed uint64, auto bool) error {
	m := p.mod
	// This caller's bound, whatever flight of the module it joins (one
	// that another Provider began, with a longer DrainTimeout, say).
	bound := p.cfg.DrainTimeout + 2*p.cfg.ProbeTimeout
	t := time.NewTimer(bound)
	defer t.Stop()
	// A flight for another Provider's token moves only that Provider: try
	// again, a few times.
	for range 4 {
		if gen, s := p.gate.load(); s == StateClosed {
			return &Error{Op: "reinitialize", Generation: gen, Err: ErrClosed}
		} else if gen > failed {
			return nil
		}
		key, tokenOnly := "module", false
		if auto && p.tokenScoped() {
			key, tokenOnly = fmt.Sprintf("token %p", p), true
		}
		ch := m.flights.DoChan(key, func() (any, error) {
			return m.reinitialize(p, failed, tokenOnly), nil
		})
		select {
		case r := <-ch:
			if err, took := r.Val.(outcome)[p]; took {
				return err
			}
		case <-ctx.Done():
			return &Error{Op: "reinitialize", Generation: p.Generation(), Err: ctx.Err()}
		case <-t.C:
			return &Error{Op: "reinitialize", Generation: p.Generation(),
				Err: wrapf(ErrUnavailable, "the module's re-initialization, shared with other Providers of it, did not end within this Provider's bound (%v: DrainTimeout plus twice ProbeTimeout); it goes on", bound)}
		}
	}
	if gen, _ := p.gate.load(); gen > failed {
		return nil
	}
	return &Error{Op: "reinitialize", Generation: p.Generation(),
		Err: wrapf(ErrUnavailable, "re-initializations of the module for other Providers kept running; try again")}
}

// tokenScoped reports whether the provider's loss is its token's alone, as
// far as the calls tell: the token is not present, removed, not recognized
// or logged out, was not found again, or its slot's C_GetTokenInfo failed
// while the module answered C_GetSlotList (tokenLoss).
func (p *Provider) tokenScoped() bool {
	err := p.LastError()
	if err == nil {
		return false
	}
	var tl tokenLoss
	if errors.Is(err, ErrTokenNotFound) || errors.As(err, &tl) {
		return true
	}
	switch code, _ := codeOf(err); code {
	case pkcs11.CKR_TOKEN_NOT_PRESENT, pkcs11.CKR_DEVICE_REMOVED, pkcs11.CKR_TOKEN_NOT_RECOGNIZED, pkcs11.CKR_USER_NOT_LOGGED_IN:
		return true
	}
	return false
}

// answersElsewhere reports whether another open, healthy Provider of the
// module, of another token, answers a probe now (within its ProbeTimeout):
// then the module is alive, and a loss of p's token is p's token's alone.
func (m *module) answersElsewhere(p *Provider, provs []*Provider) bool {
	for _, q := range provs {
		if q == p || q.State() != StateHealthy {
			continue
		}
		in := q.inst.Load()
		if in == nil || (p.serial != "" && in.token.SerialNumber == p.serial) {
			continue
		}
		done := make(chan struct{})
		go func() { // returns when the library does
			q.probe()
			close(done)
		}()
		t := time.NewTimer(q.cfg.ProbeTimeout)
		answered := false
		select {
		case <-done:
			answered = true
		case <-t.C: // no answer: not proof that the module lives
		}
		t.Stop()
		if answered && q.State() == StateHealthy {
			return true
		}
	}
	return false
}

// reinitialize does the work of one re-initialization for p, unless p has
// already moved past generation failed. With tokenOnly, when another
// Provider of the module on another token answers, it drains p alone and
// sets up p's next generation in the module as it is: its token is found
// and logged in again, without C_Finalize (p's old sessions are left to
// the module: a removed token took them with it, and closing them by
// number could close another Provider's). Otherwise it re-initializes the
// module for every Provider attached. Each of its waits is bounded: the
// module's life and the drain by p's Config.DrainTimeout together,
// C_Finalize and the set-up of the next generations (C_Initialize to the
// last C_Login) by p's Config.ProbeTimeout each (a call that does not
// return in time fails the attempt with ErrHung), and the Close of the
// last open Provider interrupts any of them.
func (m *module) reinitialize(p *Provider, failed uint64, tokenOnly bool) outcome {
	const op = "reinitialize"
	start := time.Now()
	_, stop := m.attached()
	if err := m.lock(start.Add(p.cfg.DrainTimeout), stop); err != nil {
		gen, _ := p.gate.load()
		if err == errStopped {
			return outcome{p: &Error{Op: op, Generation: gen, Err: ErrClosed}}
		}
		sentinel := ErrDrainTimeout
		if m.call.Load() != nil {
			sentinel = ErrHung
		}
		return outcome{p: p.reinitFailed(gen, &Error{Op: op, Generation: gen, Err: causedBy(sentinel, err)})}
	}
	defer m.unlock()
	provs, stop := m.attached()
	gen, state := p.gate.load()
	switch {
	case state == StateClosed:
		return outcome{p: &Error{Op: op, Generation: gen, Err: ErrClosed}}
	case gen > failed:
		return outcome{p: nil}
	}
	// Providers that have not joined (an Open waiting for the module's
	// life, or one that failed) have no operation and no generation yet.
	provs = slices.DeleteFunc(provs, func(q *Provider) bool { return !q.joined })
	tokenOnly = tokenOnly && m.initialized && m.answersElsewhere(p, provs)
	// part: the Providers whose generation moves on; drain: those whose
	// calls must end first.
	part, drain := []*Provider{p}, []*Provider{p}
	if !tokenOnly {
		drain = provs
		for _, q := range provs {
			if _, st := q.gate.load(); q != p && st != StateClosed && st != StateFailed {
				part = append(part, q)
			}
		}
	}
	// Debug: automatic recovery retries every RecoveryBackoffMax at most;
	// failures are logged by setState, at most once a minute.
	p.log.Debug("hsm: re-initializing", "module", m.path, "generation", gen, "providers", len(part), "token_only", tokenOnly)

	// Stop admitting operations of these generations and wake those
	// waiting for a session, then wait for the calls inside the library.
	gens := make(map[*Provider]uint64, len(part))
	for _, q := range part {
		g, _ := q.gate.load()
		gens[q] = g
		q.setState(g, StateReinitializing, nil)
		if in := q.inst.Load(); in != nil {
			in.stop()
		}
	}
	failAll := func(err error) outcome {
		out := outcome{}
		for _, q := range part {
			out[q] = q.reinitFailed(gens[q], atGen(err, gens[q]))
		}
		return out
	}
	ctx, cancel := context.WithDeadline(context.Background(), start.Add(p.cfg.DrainTimeout))
	defer cancel()
	for _, q := range drain {
		err := q.gate.drain(ctx, stop)
		if err == errStopped {
			return failAll(err)
		}
		if err != nil {
			return failAll(&Error{Op: op, Generation: gen,
				Err: wrapf(ErrDrainTimeout, "%d calls in flight (%s) after %v; not finalizing", q.gate.inFlight(), q.describe(), p.cfg.DrainTimeout)})
		}
	}

	if tokenOnly {
		// The module stays up for the others: p's token alone is found,
		// logged in and set up again.
		old := p.inst.Swap(nil)
		var in *instance
		loggedOut := false
		if code, _ := codeOf(p.LastError()); code == pkcs11.CKR_USER_NOT_LOGGED_IN {
			loggedOut = true // the token is there, its login gone: its sessions are good
		}
		err := m.inModule(op, gen, fmt.Sprintf("C_OpenSession to C_Login of generation %d (the token alone)", gen+1), p.cfg.ProbeTimeout, stop, func() (err error) {
			// The old instance is given back first, also when p has closed
			// meanwhile: its end (finish) finds no instance then.
			if old != nil && old.epoch == m.epoch {
				m.unuse(p, old.login, old.token.SerialNumber, false)
				if loggedOut {
					old.closeSessions()
				}
			}
			if p.State() == StateClosed {
				return errStopped
			}
			if in, err = p.setup(op, gen+1); err == nil {
				p.inst.Store(in)
			}
			return err
		})
		if err != nil {
			return failAll(err)
		}
		p.moveOn(gen, in, start)
		return outcome{p: nil}
	}

	// Nothing is inside the library: every handle of the module dies
	// here, and no code path can reach one again (every gate refuses its
	// generation).
	for _, q := range part {
		q.inst.Store(nil)
	}
	err := m.inModule(op, gen, "C_Finalize", p.cfg.ProbeTimeout, stop, func() error {
		m.finalize(p.log.Warn)
		return nil
	})
	if err != nil {
		return failAll(err)
	}
	for _, q := range part {
		if q.testHookFinalized != nil {
			q.testHookFinalized()
		}
	}
	// Written by the module's goroutine, read only once it has returned.
	ins := make([]*instance, len(part))
	errs := make([]error, len(part))
	err = m.inModule(op, gen, fmt.Sprintf("C_Initialize to C_Login of generation %d", gen+1), p.cfg.ProbeTimeout, stop, func() error {
		if err := m.initialize(op, gen); err != nil {
			return err
		}
		for i, q := range part {
			if q.State() == StateClosed {
				errs[i] = errStopped // closed since: nothing to set up
				continue
			}
			if ins[i], errs[i] = q.setup(op, gens[q]+1); errs[i] == nil {
				q.inst.Store(ins[i]) // a call that outlives the bound leaves it to finish
			}
		}
		return nil
	})
	if err != nil {
		return failAll(err)
	}
	out := outcome{}
	for i, q := range part {
		if errs[i] != nil {
			out[q] = q.reinitFailed(gens[q], errs[i])
			continue
		}
		q.moveOn(gens[q], ins[i], start)
		out[q] = nil
	}
	p.log.Info("hsm: re-initialized the module", "module", m.path, "providers", len(part), "took", time.Since(start))
	return out
}

// moveOn makes in, set up, the provider's generation gen+1 (and learns
// the token's serial number of a late member from it).
func (p *Provider) moveOn(gen uint64, in *instance, start time.Time) {
	if p.serial == "" {
		p.serial = in.token.SerialNumber // a member that joined late (open): its first generation
	}
	if p.State() == StateClosed {
		return // closed since: its end (finish) gives the instance back
	}
	p.reinits.Add(1)
	p.setState(gen+1, StateHealthy, nil)
	p.log.Info("hsm: re-initialized", "generation", gen+1, "took", time.Since(start))
}

// atGen returns err, an *Error of a re-initialization, for the provider in
// generation gen.
func atGen(err error, gen uint64) error {
	if e, ok := err.(*Error); ok && e.Generation != gen {
		c := *e
		c.Generation = gen
		return &c
	}
	return err
}

// describe names the provider's token, for errors.
func (p *Provider) describe() string {
	if p.serial != "" {
		return fmt.Sprintf("token serial %q", p.serial)
	}
	return selectorText(p.cfg)
}

// reinitFailed records a failed attempt of generation gen and returns its
// error: the provider stays unavailable, or fails for good when retrying
// cannot help. An attempt that the Close of the last open Provider
// interrupted leaves the state to Close.
func (p *Provider) reinitFailed(gen uint64, err error) error {
	if err == errStopped {
		return &Error{Op: "reinitialize", Generation: gen, Err: ErrClosed}
	}
	p.health.reinitFailures.Add(1)
	if errors.Is(err, ErrPIN) || errors.Is(err, ErrTokenChanged) {
		// Retrying cannot help, and retrying a PIN can lock the token.
		p.setState(gen, StateFailed, err)
	} else {
		p.setState(gen, StateUnavailable, err)
	}
	return err
}
