package hsm

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// State is the provider's state as far as admitting operations goes.
type State uint32

const (
	// StateHealthy: operations of the current generation are admitted.
	StateHealthy State = iota
	// StateUnavailable: operations fail fast with ErrUnavailable; a
	// re-initialization is needed (or failed and must be retried).
	StateUnavailable
	// StateReinitializing: a re-initialization is draining calls in flight
	// or re-opening the library; operations fail fast with ErrUnavailable.
	StateReinitializing
	// StateClosed: Close was called; everything fails with ErrClosed.
	StateClosed
	// StateFailed: a re-initialization hit an error that retrying cannot
	// fix: the token rejected the PIN (retrying could lock it), or a token
	// with another serial number answers to the selector. Operations fail
	// fast with ErrUnavailable, automatic recovery has stopped, LastError
	// says why; an explicit Reinitialize tries once more.
	StateFailed
)

func (s State) String() string {
	switch s {
	case StateHealthy:
		return "healthy"
	case StateUnavailable:
		return "unavailable"
	case StateReinitializing:
		return "reinitializing"
	case StateClosed:
		return "closed"
	case StateFailed:
		return "failed"
	}
	return fmt.Sprintf("State(%d)", uint32(s))
}

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

// health is the state machine's data beside the gate (which holds the
// generation and the State): the lock that orders state changes, what they
// leave behind (LastError, Since, the changed channel), the channels of the
// monitor and of OnStateChange's notifier, and the counters Stats reads.
type health struct {
	// Counters, read by Stats.
	ops, refused, failed  atomic.Uint64
	reinitFailures        atomic.Uint64
	probes, probeFailures atomic.Uint64
	lastChange            atomic.Int64 // unix nanoseconds

	probing    atomic.Bool  // a probe goroutine runs
	probeSince atomic.Int64 // unix nanoseconds; 0 when no probe is inside the library

	// The monitor's channels and OnStateChange's notifier, set by init
	// (and Open) and not changed after.
	kick        chan struct{} // wakes the monitor
	stop        chan struct{} // closed by Close
	stopOnce    sync.Once
	monitorDone chan struct{}
	events      *notifier[StateChange] // nil without OnStateChange

	mu            sync.Mutex // protects following fields, and orders state changes (setState, markLost)
	byCode        map[uint]uint64
	lastErr       error
	changed       chan struct{} // closed and replaced at every state change
	logNext       time.Time     // rate limit of "re-initialization failed" lines
	logSuppressed int
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
// change, unless the provider is closed: StateClosed is final, and a
// re-initialization that ends after Close leaves it so. Callers hold the
// module's life; Close (closeState) and markLost change the state without
// it. The change and its bookkeeping happen under h.mu, so that every
// observer sees changes in one order: OnStateChange's events, LastError,
// Since.
func (p *Provider) setState(gen uint64, to State, cause error) {
	h := &p.health
	h.mu.Lock()
	_, from := p.gate.load()
	if from == StateClosed {
		h.mu.Unlock()
		return
	}
	p.gate.set(gen, to)
	p.recordLocked(from, to, gen, cause)
	h.mu.Unlock()
	p.announce(from, to, gen, cause)
}

// closeState moves the provider to StateClosed, in its generation. It
// reports the generation, the state it was in and whether this call closed
// it.
func (p *Provider) closeState() (gen uint64, from State, first bool) {
	h := &p.health
	h.mu.Lock()
	gen, from = p.gate.load()
	if from == StateClosed {
		h.mu.Unlock()
		return gen, from, false
	}
	p.gate.set(gen, StateClosed)
	p.recordLocked(from, StateClosed, gen, nil)
	h.mu.Unlock()
	p.announce(from, StateClosed, gen, nil)
	return gen, from, true
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
	h.events.send(StateChange{From: from, To: to, Generation: gen, Err: cause, At: now})
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

// observe accounts for the error of an admitted call of generation gen (in
// ErrorsByCode; with op, an operation of the user's, in Failed too, not a
// probe's) and, with react, reacts to it: a device-loss code makes the
// provider unavailable, a suspect code asks the monitor for a probe.
func (p *Provider) observe(gen uint64, err error, react, op bool) {
	code, ok := codeOf(err)
	if !ok {
		return
	}
	h := &p.health
	if op {
		h.failed.Add(1)
	}
	h.mu.Lock()
	h.byCode[code]++
	h.mu.Unlock()
	if !react {
		return
	}
	switch classify(code) {
	case classDeviceLost:
		p.markLost(gen, err)
	case classSuspect:
		h.poke()
	}
}

// changes returns a channel that is closed at the provider's next state
// change.
func (p *Provider) changes() <-chan struct{} {
	p.health.mu.Lock()
	defer p.health.mu.Unlock()
	return p.health.changed
}

// LastError returns the error that last made the provider unavailable or
// failed, or nil when it is healthy. In StateFailed it says why automatic
// recovery stopped (errors.Is(err, ErrPIN), ErrTokenChanged).
func (p *Provider) LastError() error {
	p.health.mu.Lock()
	defer p.health.mu.Unlock()
	return p.health.lastErr
}

// waitHealthyFor is WaitHealthy for the operation op, which waits for the
// provider before it runs: WaitHealthy's *Error, as op's (it matches
// ErrUnavailable and ctx's error, or ErrClosed).
func (p *Provider) waitHealthyFor(ctx context.Context, op string) error {
	err := p.WaitHealthy(ctx)
	if err == nil {
		return nil
	}
	e := *err.(*Error)
	e.Op = op
	return &e
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
