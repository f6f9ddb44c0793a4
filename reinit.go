package hsm

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Reinitialize re-initializes the PKCS#11 library: it stops admitting
// operations (they fail fast with ErrUnavailable), waits up to
// Config.DrainTimeout for calls in flight, calls C_Finalize and
// C_Initialize, finds the token again by its selector (it must have the same
// serial number as at Open), logs in and moves to the next generation. Keys
// of earlier generations then fail with ErrStaleKey; look them up again.
//
// Concurrent calls share one re-initialization. A call made while the
// provider is already past the generation it was in when the call began
// returns nil at once, so a stampede of callers that all saw the same outage
// causes one re-initialization. Callers that know which generation failed
// should use ReinitializeFrom.
//
// If calls are still in flight after DrainTimeout, it returns an error
// wrapping ErrDrainTimeout and does not finalize. If C_Finalize, or
// C_Initialize to C_Login, does not return within Config.ProbeTimeout (a
// frozen HSM), it returns an error wrapping ErrHung, and later attempts fail
// at once with ErrHung until that call has returned: no second C_Finalize
// or C_Initialize enters the module meanwhile. If the HSM is still down, it
// returns the error. In each case the provider stays unavailable and a later
// call may succeed. It never waits longer than DrainTimeout plus twice
// ProbeTimeout, and Close interrupts it (ErrClosed).
//
// It may be called from inside Config.OnStateChange.
//
// ctx bounds how long this caller waits; it does not cancel the shared
// re-initialization, which other callers may be waiting for.
func (p *Provider) Reinitialize(ctx context.Context) error {
	return p.ReinitializeFrom(ctx, p.Generation())
}

// ReinitializeFrom re-initializes the library if it is still in generation
// failed, the generation in which the caller saw an operation fail (see
// Error.Generation). If the provider has already moved past failed, it
// returns nil without doing anything. Otherwise it behaves as Reinitialize.
func (p *Provider) ReinitializeFrom(ctx context.Context, failed uint64) error {
	if gen, s := p.gate.load(); s == StateClosed {
		return &Error{Op: "reinitialize", Generation: gen, Err: ErrClosed}
	} else if gen > failed {
		return nil
	}
	ch := p.flights.DoChan("reinit", func() (any, error) {
		return nil, p.reinitialize(failed)
	})
	select {
	case r := <-ch:
		return r.Err
	case <-ctx.Done():
		return &Error{Op: "reinitialize", Generation: p.Generation(), Err: ctx.Err()}
	}
}

// reinitialize does the work of one re-initialization, unless the provider
// has already moved past generation failed. Each of its waits is bounded:
// the drain by Config.DrainTimeout, C_Finalize and the set-up of the next
// generation (C_Initialize to C_Login) by Config.ProbeTimeout each (a call
// that does not return in time fails the attempt with ErrHung), and Close
// interrupts any of them.
func (p *Provider) reinitialize(failed uint64) error {
	const op = "reinitialize"
	p.life.Lock()
	defer p.life.Unlock()
	gen, state := p.gate.load()
	switch {
	case state == StateClosed:
		return &Error{Op: op, Generation: gen, Err: ErrClosed}
	case gen > failed:
		return nil
	}
	start := time.Now()
	// Debug: automatic recovery retries every RecoveryBackoffMax at most;
	// failures are logged by setState, at most once a minute.
	p.log.Debug("hsm: re-initializing the PKCS#11 library", "module", p.modPath, "generation", gen)

	// Stop admitting operations of this generation and wake those waiting
	// for a session, then wait for the calls inside the library.
	p.setState(gen, StateReinitializing, nil)
	if in := p.inst.Load(); in != nil {
		in.stop()
	}
	stop := p.health.stop
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.DrainTimeout)
	err := p.gate.drain(ctx, stop)
	cancel()
	if err != nil && err != errStopped {
		err = &Error{Op: op, Generation: gen,
			Err: wrapf(ErrDrainTimeout, "%d calls in flight after %v; not finalizing", p.gate.inFlight(), p.cfg.DrainTimeout)}
	}
	if err != nil {
		return p.reinitFailed(gen, err)
	}

	// Nothing is inside the library: every handle of this generation dies
	// here, and no code path can reach one again (the gate refuses gen).
	p.inst.Store(nil)
	err = p.inModule(op, gen, "C_Finalize", stop, func() error {
		p.finalize()
		return nil
	})
	if err != nil {
		return p.reinitFailed(gen, err)
	}
	if p.testHookFinalized != nil {
		p.testHookFinalized()
	}
	var in *instance
	err = p.inModule(op, gen, fmt.Sprintf("C_Initialize to C_Login of generation %d", gen+1), stop, func() (err error) {
		in, err = p.start(gen + 1)
		return err
	})
	if err != nil {
		return p.reinitFailed(gen, err)
	}
	if p.serial == "" {
		p.serial = in.token.SerialNumber // a member that joined late (open): its first generation
	}
	p.inst.Store(in)
	p.reinits.Add(1)
	p.setState(gen+1, StateHealthy, nil)
	p.log.Info("hsm: re-initialized", "generation", gen+1, "took", time.Since(start))
	return nil
}

// reinitFailed records a failed attempt of generation gen and returns its
// error: the provider stays unavailable, or fails for good when retrying
// cannot help. An attempt that Close interrupted leaves the state to Close.
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
