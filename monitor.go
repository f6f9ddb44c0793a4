package hsm

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/miekg/pkcs11"
)

// monitor is the provider's background goroutine: it probes the HSM while
// healthy (every ProbeInterval, when an operation returns a suspect code or
// waits in vain for a session, and when the watchdog sees calls make no
// progress), watches for a frozen HSM, and re-initializes with exponential
// backoff and jitter while unavailable. It stops when Close closes h.stop.
func (p *Provider) monitor() {
	h := &p.health
	defer close(h.monitorDone)
	var tick <-chan time.Time
	if p.cfg.ProbeInterval > 0 {
		t := time.NewTicker(p.cfg.ProbeInterval)
		defer t.Stop()
		tick = t.C
	}
	watch := time.NewTicker(p.watchEvery())
	defer watch.Stop()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { // ends with the monitor: cancel or stop
		select {
		case <-h.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	backoff := p.cfg.RecoveryBackoffMin
	for {
		gen, st := p.gate.load()
		switch st {
		case StateClosed:
			return
		case StateUnavailable:
			if p.cfg.DisableAutoRecovery {
				break
			}
			err := p.reinitFrom(ctx, gen, true)
			if ctx.Err() != nil {
				return
			}
			if err == nil {
				backoff = p.cfg.RecoveryBackoffMin
				continue
			}
			// Jitter in [backoff/2, backoff): callers of many processes
			// that lost one HSM do not return in step.
			d := backoff/2 + rand.N(backoff/2+1)
			backoff = min(2*backoff, p.cfg.RecoveryBackoffMax)
			t := time.NewTimer(d)
			select {
			case <-h.stop:
				t.Stop()
				return
			case <-t.C:
			}
			continue
		case StateHealthy:
			backoff = p.cfg.RecoveryBackoffMin
		}
		select {
		case <-h.stop:
			return
		case <-h.kick:
			p.startProbe()
		case <-tick:
			p.startProbe()
		case <-watch.C:
			p.watchdog()
		}
	}
}

// watchEvery is how often the watchdog looks at the calls in the library:
// a tenth of ProbeTimeout, at most half a second, so that a frozen HSM is
// noticed at most that long after ProbeTimeout.
func (p *Provider) watchEvery() time.Duration {
	return max(min(p.cfg.ProbeTimeout/10, 500*time.Millisecond), time.Millisecond)
}

// watchdog notices a frozen HSM under load. While calls are inside the
// library and none completes, it starts a probe once that has lasted
// watchEvery (the probe's calls complete if the HSM answers), and decides
// that the HSM hangs once it has lasted ProbeTimeout, as it does when a
// probe has had no answer for ProbeTimeout. Then the provider becomes
// unavailable and the operations waiting for a session fail at once.
func (p *Provider) watchdog() {
	gen, st := p.gate.load()
	if st != StateHealthy {
		return
	}
	in := p.inst.Load()
	if in == nil || in.gen != gen {
		return
	}
	now := time.Now()
	if since := p.health.probeSince.Load(); since != 0 {
		if d := now.Sub(time.Unix(0, since)); d > p.cfg.ProbeTimeout {
			p.health.probeFailures.Add(1)
			p.markLost(gen, &Error{Op: "probe", Generation: gen, Err: wrapf(ErrHung, "no answer in %v", d.Round(time.Millisecond))})
			return
		}
	}
	calls := in.calls.Load()
	if calls == 0 {
		return
	}
	stalled := now.Sub(time.Unix(0, in.progress.Load()))
	switch {
	case stalled > p.cfg.ProbeTimeout:
		p.markLost(gen, &Error{Op: "watchdog", Generation: gen,
			Err: wrapf(ErrHung, "%d calls inside the PKCS#11 library and none completed for %v", calls, stalled.Round(time.Millisecond))})
	case stalled > p.watchEvery():
		p.startProbe()
	}
}

// startProbe starts a probe in a goroutine of its own, unless one is still
// running (a probe stuck inside the library is the watchdog's to judge) or
// the provider is not healthy.
func (p *Provider) startProbe() {
	h := &p.health
	if _, st := p.gate.load(); st != StateHealthy || !h.probing.CompareAndSwap(false, true) {
		return
	}
	h.probes.Add(1)
	go func() { // returns when the library returns
		defer h.probing.Store(false)
		p.probe()
	}()
}

// probe checks, in the current generation, that the token is still in its
// slot with the same serial number and that the login session is still
// logged in. It goes through run like an operation, so that probes never
// add to the calls inside the library beyond MaxSessions, waiting up to
// ProbeTimeout for a session. A probe that finds the token gone, changed
// or logged out, or gets a PKCS#11 error, makes the provider unavailable;
// one that gets no answer is judged by the watchdog.
func (p *Provider) probe() {
	const op = "probe"
	h := &p.health
	gen, _ := p.gate.load()
	err := p.run(gen, newRefusals(op, gen), p.cfg.ProbeTimeout, runOwn, func(in *instance, _ pkcs11.SessionHandle) error {
		h.probeSince.Store(time.Now().UnixNano())
		defer h.probeSince.Store(0)
		return p.probeOn(in)
	})
	if err == nil || errors.Is(err, ErrUnavailable) || errors.Is(err, ErrBusy) || errors.Is(err, ErrClosed) || errors.Is(err, ErrStaleKey) {
		return // healthy, or no verdict: the gate or the watchdog decides
	}
	h.probeFailures.Add(1)
	p.markLost(gen, err)
}

func (p *Provider) probeOn(in *instance) error {
	const op = "probe"
	gen := in.gen
	slots, err := slotList(in.ctx)
	if err != nil {
		return p11err(op, gen, err)
	}
	present := false
	for _, s := range slots {
		present = present || s == in.slot
	}
	if !present {
		return &Error{Op: op, Generation: gen, Code: pkcs11.CKR_TOKEN_NOT_PRESENT, Err: fmt.Errorf("slot %d no longer holds a token: %w", in.slot, pkcs11.Error(pkcs11.CKR_TOKEN_NOT_PRESENT))}
	}
	ti, err := in.ctx.GetTokenInfo(in.slot)
	if err != nil {
		return p11err(op, gen, tokenLoss{err}) // the module answered the slot list
	}
	if ti.SerialNumber != in.token.SerialNumber {
		return opErr(op, gen, ErrTokenChanged, "slot %d now holds serial %q, not %q", in.slot, ti.SerialNumber, in.token.SerialNumber)
	}
	if !p.cfg.NoLogin {
		si, err := in.ctx.GetSessionInfo(in.login)
		if err != nil {
			return p11err(op, gen, err)
		}
		if si.State != pkcs11.CKS_RW_USER_FUNCTIONS && si.State != pkcs11.CKS_RO_USER_FUNCTIONS {
			return &Error{Op: op, Generation: gen, Code: pkcs11.CKR_USER_NOT_LOGGED_IN,
				Err: fmt.Errorf("the login session is no longer logged in (session state %d): %w", si.State, pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN))}
		}
	}
	return nil
}

// stopBackground stops the monitor and waits for it, which is quick: the
// monitor waits only in selects that watch h.stop.
func (p *Provider) stopBackground() {
	h := &p.health
	h.stopOnce.Do(func() { close(h.stop) })
	<-h.monitorDone
}
