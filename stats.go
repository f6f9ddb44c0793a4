package hsm

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

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
	// Counters, read by Stats.
	ops, refused, failed  atomic.Uint64
	reinitFailures        atomic.Uint64
	probes, probeFailures atomic.Uint64
	eventsDropped         atomic.Uint64
	lastChange            atomic.Int64 // unix nanoseconds

	probing    atomic.Bool  // a probe goroutine runs
	probeSince atomic.Int64 // unix nanoseconds; 0 when no probe is inside the library
	notifier   atomic.Uint64
	muted      atomic.Bool // Close was called from inside OnStateChange: deliver no more

	// The monitor's and the notifier's channels, set by init (and Open)
	// and not changed after.
	kick                    chan struct{} // wakes the monitor
	stop                    chan struct{} // closed by Close
	stopOnce                sync.Once
	monitorDone, notifyDone chan struct{}
	events                  chan StateChange // nil without OnStateChange

	mu            sync.Mutex // protects following fields, and orders state changes (setState, markLost)
	byCode        map[uint]uint64
	lastErr       error
	changed       chan struct{} // closed and replaced at every state change
	logNext       time.Time     // rate limit of "re-initialization failed" lines
	logSuppressed int
	eventsClosed  bool
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
