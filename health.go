package hsm

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// Defaults for the health settings of Config.
const (
	DefaultProbeInterval      = 10 * time.Second
	DefaultProbeTimeout       = 5 * time.Second
	DefaultRecoveryBackoffMin = 50 * time.Millisecond
	DefaultRecoveryBackoffMax = time.Second
)

// ErrHung is the cause recorded when the HSM stops answering: a probe got no
// answer, or no call completed, within Config.ProbeTimeout.
var ErrHung = errors.New("hsm: HSM not answering")

// StateChange describes one change of Provider.State, as passed to
// Config.OnStateChange.
type StateChange struct {
	From, To State
	// Generation is the generation after the change.
	Generation uint64
	// Err is what caused the change to Unavailable or Failed, or the error
	// of a failed re-initialization; nil otherwise.
	Err error
	At  time.Time
}

// Stats is a snapshot of a provider's health and activity.
type Stats struct {
	Generation uint64
	State      State
	// Since is when the state last changed.
	Since time.Time
	// LastError is the last error that changed the state, or nil.
	LastError error
	// Operations counts the operations admitted (signatures, decryptions,
	// key lookups); Refused those refused without a PKCS#11 call
	// (ErrStaleKey, ErrUnavailable, ErrClosed); Failed the admitted ones that
	// failed with a PKCS#11 error.
	Operations, Refused, Failed uint64
	// ErrorsByCode counts PKCS#11 errors by their name, e.g.
	// "CKR_DEVICE_ERROR (0x30)".
	ErrorsByCode map[string]uint64
	// InFlight is the number of operations inside the PKCS#11 library now.
	InFlight int64
	// Reinitializations succeeded; ReinitializationFailures did not.
	Reinitializations, ReinitializationFailures uint64
	// Probes run, and how many of them found the HSM lost or hung.
	Probes, ProbeFailures uint64
	// EventsDropped counts state changes not delivered to OnStateChange
	// because it fell behind.
	EventsDropped uint64
}

// health holds the provider's health bookkeeping.
type health struct {
	ops, refused, failed    atomic.Uint64
	reinitFailures          atomic.Uint64
	probes, probeFailures   atomic.Uint64
	eventsDropped           atomic.Uint64
	lastChange              atomic.Int64 // unix nanoseconds
	probing                 atomic.Bool
	mu                      sync.Mutex
	byCode                  map[uint]uint64
	lastErr                 error
	changed                 chan struct{} // closed and replaced at every state change
	logNext                 time.Time     // rate limit of "re-initialization failed" lines
	logSuppressed           int
	kick                    chan struct{} // wakes the monitor
	stop                    chan struct{} // closed by Close
	stopOnce                sync.Once
	monitorDone, notifyDone chan struct{}
	events                  chan StateChange
	eventsClosed            bool // guarded by mu
}

func (h *health) init() {
	h.byCode = map[uint]uint64{}
	h.changed = make(chan struct{})
	h.kick = make(chan struct{}, 1)
	h.stop = make(chan struct{})
	h.monitorDone = make(chan struct{})
	h.lastChange.Store(time.Now().UnixNano())
}

// poke wakes the monitor without blocking.
func (h *health) poke() {
	select {
	case h.kick <- struct{}{}:
	default:
	}
}

// setState moves the gate to (gen, to) and does the bookkeeping of a state
// change. Callers hold p.life, except Open before the provider is shared.
func (p *Provider) setState(gen uint64, to State, cause error) {
	_, from := p.gate.load()
	p.gate.set(gen, to)
	p.changedState(from, to, gen, cause)
}

// changedState records, announces and logs a state change that has happened.
func (p *Provider) changedState(from, to State, gen uint64, cause error) {
	h := &p.health
	now := time.Now()
	h.lastChange.Store(now.UnixNano())
	h.mu.Lock()
	if cause != nil {
		h.lastErr = cause
	} else if to == StateHealthy {
		h.lastErr = nil
	}
	close(h.changed)
	h.changed = make(chan struct{})
	if h.events != nil && !h.eventsClosed {
		select {
		case h.events <- StateChange{From: from, To: to, Generation: gen, Err: cause, At: now}:
		default:
			h.eventsDropped.Add(1)
		}
	}
	h.mu.Unlock()
	h.poke()

	switch {
	case to == StateUnavailable && from == StateHealthy:
		p.log.Warn("hsm: HSM lost; operations fail fast until it is re-initialized", "generation", gen, "err", cause)
	case to == StateUnavailable && from == StateReinitializing:
		p.logReinitFailure(gen, cause)
	case to == StateFailed:
		p.log.Error("hsm: re-initialization cannot succeed without a change; automatic recovery stopped", "generation", gen, "err", cause)
	case to == StateHealthy && from != StateHealthy:
		p.log.Info("hsm: healthy", "generation", gen)
	}
}

// logReinitFailure logs failed re-initializations: the first at once, then
// at most one line a minute with how many were not logged.
func (p *Provider) logReinitFailure(gen uint64, err error) {
	h := &p.health
	h.mu.Lock()
	now := time.Now()
	if now.Before(h.logNext) {
		h.logSuppressed++
		h.mu.Unlock()
		return
	}
	n := h.logSuppressed
	h.logSuppressed = 0
	h.logNext = now.Add(time.Minute)
	h.mu.Unlock()
	p.log.Warn("hsm: re-initialization failed; provider stays unavailable", "generation", gen, "err", err, "failures_not_logged", n)
}

// markLost moves the provider from healthy to unavailable in generation gen,
// once: the first device-loss error wins, later ones find the state changed.
// Operations waiting for a session of gen are woken and fail fast.
func (p *Provider) markLost(gen uint64, cause error) {
	if !p.gate.word.CompareAndSwap(pack(gen, StateHealthy), pack(gen, StateUnavailable)) {
		return
	}
	if in := p.inst.Load(); in != nil && in.gen == gen {
		in.stop()
	}
	p.changedState(StateHealthy, StateUnavailable, gen, cause)
}

// observe accounts for the error of an admitted operation of generation gen
// and reacts to it: a device-loss code makes the provider unavailable, a
// suspect code asks the monitor for a probe.
func (p *Provider) observe(gen uint64, err error) {
	code, ok := CodeOf(err)
	if !ok {
		return
	}
	h := &p.health
	h.failed.Add(1)
	h.mu.Lock()
	h.byCode[code]++
	h.mu.Unlock()
	switch classifyCode(code) {
	case ClassDeviceLost:
		p.markLost(gen, err)
	case ClassSuspect:
		h.poke()
	}
}

// Stats returns a snapshot of the provider's health and activity. It makes
// no PKCS#11 call and never blocks for long. Safe for concurrent use.
func (p *Provider) Stats() Stats {
	h := &p.health
	gen, st := p.gate.load()
	s := Stats{
		Generation: gen, State: st,
		Since:                    time.Unix(0, h.lastChange.Load()),
		Operations:               h.ops.Load(),
		Refused:                  h.refused.Load(),
		Failed:                   h.failed.Load(),
		InFlight:                 p.gate.inFlight(),
		Reinitializations:        p.reinits.Load(),
		ReinitializationFailures: h.reinitFailures.Load(),
		Probes:                   h.probes.Load(),
		ProbeFailures:            h.probeFailures.Load(),
		EventsDropped:            h.eventsDropped.Load(),
		ErrorsByCode:             map[string]uint64{},
	}
	h.mu.Lock()
	s.LastError = h.lastErr
	for code, n := range h.byCode {
		s.ErrorsByCode[CodeName(code)] = n
	}
	h.mu.Unlock()
	return s
}

// LastError returns the error that last made the provider unavailable or
// failed, or nil when it is healthy. In StateFailed it says why automatic
// recovery stopped (errors.Is(err, ErrPIN), ErrTokenChanged).
func (p *Provider) LastError() error {
	p.health.mu.Lock()
	defer p.health.mu.Unlock()
	return p.health.lastErr
}

// WaitHealthy blocks until the provider is healthy, or ctx ends, or the
// provider is closed (ErrClosed) or failed (the error that latched it). Keys
// of an earlier generation are stale after a recovery: look them up again.
// Safe for concurrent use.
func (p *Provider) WaitHealthy(ctx context.Context) error {
	for {
		p.health.mu.Lock()
		ch := p.health.changed
		p.health.mu.Unlock()
		gen, st := p.gate.load()
		switch st {
		case StateHealthy:
			return nil
		case StateClosed:
			return &Error{Op: "wait", Generation: gen, Err: ErrClosed}
		case StateFailed:
			return &Error{Op: "wait", Generation: gen, Err: causedBy(ErrUnavailable, p.LastError())}
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return &Error{Op: "wait", Generation: gen, Err: causedBy(ErrUnavailable, ctx.Err())}
		}
	}
}

// ReadyHandler returns an http.Handler for readiness probes: 200 and
// "healthy generation N" while the provider is healthy, 503 and the state
// and last error otherwise. It makes no PKCS#11 call.
func (p *Provider) ReadyHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.Header().Set("Cache-Control", "no-store")
		gen, st := p.gate.load()
		if st == StateHealthy {
			fmt.Fprintf(w, "healthy generation %d\n", gen)
			return
		}
		w.WriteHeader(http.StatusServiceUnavailable)
		if err := p.LastError(); err != nil {
			fmt.Fprintf(w, "%v generation %d: %v\n", st, gen, err)
			return
		}
		fmt.Fprintf(w, "%v generation %d\n", st, gen)
	})
}

// monitor is the provider's one background goroutine: it probes the HSM
// while healthy (every ProbeInterval, and when an operation returns a suspect
// code) and re-initializes with exponential backoff and jitter while
// unavailable. It stops when Close closes h.stop.
func (p *Provider) monitor() {
	h := &p.health
	defer close(h.monitorDone)
	var tick <-chan time.Time
	if p.cfg.ProbeInterval > 0 {
		t := time.NewTicker(p.cfg.ProbeInterval)
		defer t.Stop()
		tick = t.C
	}
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
			err := p.ReinitializeFrom(ctx, gen)
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
		case <-tick:
		}
		if _, st := p.gate.load(); st == StateHealthy {
			p.probe()
		}
	}
}

// probe checks, in the current generation, that the token is still in its
// slot with the same serial number and that the login session is still
// logged in. It takes a session slot like an operation (so that probes never
// add to the calls inside the library beyond MaxSessions) and runs in a
// goroutine of its own bounded by ProbeTimeout: a probe that does not
// return, or no slot and no completed call for ProbeTimeout, means the HSM
// hangs. At most one probe runs at a time.
func (p *Provider) probe() {
	h := &p.health
	if !h.probing.CompareAndSwap(false, true) {
		return // the last probe is still inside the library
	}
	gen, _ := p.gate.load()
	h.probes.Add(1)
	result := make(chan error, 1)
	go func() { // owned by the monitor; returns when the library returns
		defer h.probing.Store(false)
		result <- p.probeOnce(gen)
	}()
	t := time.NewTimer(p.cfg.ProbeTimeout)
	defer t.Stop()
	select {
	case err := <-result:
		if err != nil && !errors.Is(err, ErrUnavailable) && !errors.Is(err, errNoSlot) {
			h.probeFailures.Add(1)
			p.observe(gen, err)
			p.markLost(gen, err)
		}
	case <-t.C:
		h.probeFailures.Add(1)
		p.markLost(gen, &Error{Op: "probe", Generation: gen, Err: fmt.Errorf("%w: no answer in %v", ErrHung, p.cfg.ProbeTimeout)})
	case <-h.stop:
	}
}

// errNoSlot: every session was busy, but calls are completing: no verdict.
var errNoSlot = errors.New("no free session slot")

func (p *Provider) probeOnce(gen uint64) error {
	const op = "probe"
	if ok, _ := p.gate.enter(gen); !ok {
		return ErrUnavailable
	}
	defer p.gate.exit()
	in := p.inst.Load()
	t := time.NewTimer(p.cfg.ProbeTimeout)
	select {
	case <-in.slots:
		t.Stop()
	case <-in.closing:
		t.Stop()
		return ErrUnavailable
	case <-t.C:
		if idle := time.Since(time.Unix(0, in.lastDone.Load())); idle > p.cfg.ProbeTimeout {
			return &Error{Op: op, Generation: gen,
				Err: fmt.Errorf("%w: all %d sessions busy and no call completed for %v", ErrHung, cap(in.slots), idle.Round(time.Millisecond))}
		}
		return errNoSlot
	}
	defer func() { in.slots <- struct{}{} }()

	slots, err := in.ctx.GetSlotList(true)
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
		return p11err(op, gen, err)
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
	in.lastDone.Store(time.Now().UnixNano())
	return nil
}

// notify delivers state changes to Config.OnStateChange, in order, outside
// every lock of the provider. It ends when Close closes the events channel.
func (p *Provider) notify() {
	defer close(p.health.notifyDone)
	for ev := range p.health.events {
		p.cfg.OnStateChange(ev)
	}
}

// stopBackground stops the monitor and the notifier and waits for them.
// Called by Close before it takes p.life, since the monitor may be inside a
// re-initialization.
func (p *Provider) stopBackground() {
	h := &p.health
	h.stopOnce.Do(func() { close(h.stop) })
	<-h.monitorDone
}

func (p *Provider) closeEvents() {
	h := &p.health
	h.mu.Lock()
	if h.events != nil && !h.eventsClosed {
		h.eventsClosed = true
		close(h.events)
	}
	h.mu.Unlock()
	if h.events != nil {
		<-h.notifyDone
	}
}
