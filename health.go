package hsm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"runtime"
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
// answer, or calls inside the library made no progress, within
// Config.ProbeTimeout. Open, Reinitialize and Close return an error matching
// it when one of their own PKCS#11 calls did not return within
// Config.ProbeTimeout, or an earlier one still has not.
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
	probeSince              atomic.Int64  // unix nanoseconds; 0 when no probe is inside the library
	notifier                atomic.Uint64 // the goroutine that runs OnStateChange
	muted                   atomic.Bool   // Close was called from inside OnStateChange
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
// The change and its bookkeeping happen under h.mu, as markLost's do, so
// that every observer sees changes in one order: OnStateChange's events,
// LastError, Since.
func (p *Provider) setState(gen uint64, to State, cause error) {
	h := &p.health
	h.mu.Lock()
	_, from := p.gate.load()
	p.gate.set(gen, to)
	p.recordLocked(from, to, gen, cause)
	h.mu.Unlock()
	p.announce(from, to, gen, cause)
}

// recordLocked records and queues for OnStateChange a state change that
// has just happened. Called with h.mu held.
func (p *Provider) recordLocked(from, to State, gen uint64, cause error) {
	h := &p.health
	now := time.Now()
	h.lastChange.Store(now.UnixNano())
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
}

// announce wakes the monitor and logs a state change, outside h.mu.
func (p *Provider) announce(from, to State, gen uint64, cause error) {
	p.health.poke()
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
	if p.gate.word.Load() != pack(gen, StateHealthy) {
		return // no lock for the many that find it already done
	}
	h := &p.health
	h.mu.Lock()
	if !p.gate.word.CompareAndSwap(pack(gen, StateHealthy), pack(gen, StateUnavailable)) {
		h.mu.Unlock()
		return
	}
	p.recordLocked(StateHealthy, StateUnavailable, gen, cause)
	h.mu.Unlock()
	if in := p.inst.Load(); in != nil && in.gen == gen {
		in.stop()
	}
	p.announce(StateHealthy, StateUnavailable, gen, cause)
}

// observe accounts for the error of an admitted operation of generation gen
// and, with react, reacts to it: a device-loss code makes the provider
// unavailable, a suspect code asks the monitor for a probe.
func (p *Provider) observe(gen uint64, err error, react bool) {
	code, ok := CodeOf(err)
	if !ok {
		return
	}
	h := &p.health
	h.failed.Add(1)
	h.mu.Lock()
	h.byCode[code]++
	h.mu.Unlock()
	if !react {
		return
	}
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
			p.markLost(gen, &Error{Op: "probe", Generation: gen, Err: fmt.Errorf("%w: no answer in %v", ErrHung, d.Round(time.Millisecond))})
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
			Err: fmt.Errorf("%w: %d calls inside the PKCS#11 library and none completed for %v", ErrHung, calls, stalled.Round(time.Millisecond))})
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
	return nil
}

// notify delivers state changes to Config.OnStateChange, in order, outside
// every lock of the provider. It ends when Close closes the events channel,
// after the changes queued before; when Close was called from inside the
// callback, it delivers no more.
func (p *Provider) notify() {
	h := &p.health
	defer close(h.notifyDone)
	h.notifier.Store(goid())
	for ev := range h.events {
		if !h.muted.Load() {
			p.cfg.OnStateChange(ev)
		}
	}
}

// goid returns the id of the calling goroutine, read from the first line
// of its stack trace ("goroutine 18 [running]:"). Close uses it to know
// that it was called from inside OnStateChange.
func goid() uint64 {
	var buf [32]byte
	b := buf[:runtime.Stack(buf[:], false)]
	b, _ = bytes.CutPrefix(b, []byte("goroutine "))
	var id uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			break
		}
		id = id*10 + uint64(c-'0')
	}
	return id
}

// stopBackground stops the monitor and waits for it, which is quick: the
// monitor waits only in selects that watch h.stop. Closing h.stop also
// interrupts a re-initialization's waits.
func (p *Provider) stopBackground() {
	h := &p.health
	h.stopOnce.Do(func() { close(h.stop) })
	<-h.monitorDone
}

// closeEvents ends the delivery of state changes after the ones already
// queued; fromCallback (Close called from inside the callback) ends it
// after the running callback.
func (p *Provider) closeEvents(fromCallback bool) {
	h := &p.health
	if fromCallback {
		h.muted.Store(true)
	}
	h.mu.Lock()
	if h.events != nil && !h.eventsClosed {
		h.eventsClosed = true
		close(h.events)
	}
	h.mu.Unlock()
}
