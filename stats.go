package hsm

import (
	"fmt"
	"math"
	"net/http"
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
	// failed with a PKCS#11 error. Health probes and URI checks are not
	// operations; their PKCS#11 errors count in ErrorsByCode only.
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
	// Sessions describes the pool of operation sessions of the current
	// generation.
	Sessions SessionStats
	// Latency holds the time operations took inside the provider, from
	// admission (including the wait for a session) to the end of their
	// PKCS#11 calls, by kind: "sign", "decrypt", "lookup" (key and
	// certificate lookups, Keys, reads), "write" (GenerateKey, imports,
	// deletions) and "check" (health probes, URI checks, the proofs of
	// possession of lookups and bindings) and "derive" (key agreements,
	// ECDH of KeyExchanger and the other key-agreement kinds). Refused
	// operations are not timed. Kinds with no operation yet are present
	// with Count 0.
	Latency map[string]Histogram
}

// SessionStats is the state of the session pool, in the manner of
// sql.DBStats. Sessions are per generation: a re-initialization starts an
// empty pool; the wait counters run over the provider's life.
type SessionStats struct {
	// MaxSessions is the pool's capacity: Config.MaxSessions, lowered to
	// what the token allows.
	MaxSessions int
	// Open is the number of operation sessions open (idle plus in use; the
	// session that holds the login is not counted). InUse is the number of
	// operations holding a session slot; Idle the number of open sessions
	// waiting in the pool.
	Open, InUse, Idle int
	// WaitCount counts the operations that found every slot taken and
	// waited; WaitDuration is the total time they waited; WaitTimeouts
	// counts the waits that ended with ErrBusy.
	WaitCount    uint64
	WaitDuration time.Duration
	WaitTimeouts uint64
}

// Histogram is a latency distribution in the shape of a Prometheus
// histogram: Buckets are cumulative, each counting the observations at
// most its UpperBound; the last bucket's bound is +Inf (math.MaxInt64).
type Histogram struct {
	Count   uint64
	Sum     time.Duration
	Buckets []Bucket
}

// Bucket is one bucket of a Histogram.
type Bucket struct {
	UpperBound time.Duration
	Count      uint64 // cumulative
}

// latencyBounds are the upper bounds of Histogram's buckets, before the
// last, unbounded one: from 100 µs (a signature on a local token) to 10 s
// (a network HSM's timeouts).
var latencyBounds = [...]time.Duration{
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second,
}

// opClass is a kind of operation in Stats.Latency.
type opClass uint8

const (
	classSign opClass = iota
	classDecrypt
	classLookup
	classWrite
	classCheck
	classDerive
	numClasses
)

var classNames = [numClasses]string{"sign", "decrypt", "lookup", "write", "check", "derive"}

// histogram counts observations in latencyBounds' buckets (not cumulative)
// plus the unbounded one.
type histogram struct {
	counts [len(latencyBounds) + 1]atomic.Uint64
	sum    atomic.Int64 // nanoseconds
}

func (h *histogram) observe(d time.Duration) {
	i := 0
	for i < len(latencyBounds) && d > latencyBounds[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sum.Add(int64(d))
}

func (h *histogram) snapshot() Histogram {
	out := Histogram{Sum: time.Duration(h.sum.Load()), Buckets: make([]Bucket, len(h.counts))}
	for i := range h.counts {
		out.Count += h.counts[i].Load()
		out.Buckets[i] = Bucket{UpperBound: math.MaxInt64, Count: out.Count}
		if i < len(latencyBounds) {
			out.Buckets[i].UpperBound = latencyBounds[i]
		}
	}
	return out
}

// meter is the provider's measure of session waits and operation times.
type meter struct {
	latency                 [numClasses]histogram
	waits, waitNs, timeouts atomic.Uint64
}

// took records an operation of class c that started at start.
func (m *meter) took(c opClass, start time.Time) { m.latency[c].observe(time.Since(start)) }

// waited records a wait for a session slot that started at start.
func (m *meter) waited(start time.Time, timedOut bool) {
	m.waits.Add(1)
	m.waitNs.Add(uint64(time.Since(start)))
	if timedOut {
		m.timeouts.Add(1)
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
		EventsDropped:            h.events.droppedCount(),
		ErrorsByCode:             map[string]uint64{},
		Latency:                  make(map[string]Histogram, numClasses),
	}
	m := &p.meter
	for c := range numClasses {
		s.Latency[classNames[c]] = m.latency[c].snapshot()
	}
	s.Sessions.WaitCount, s.Sessions.WaitTimeouts = m.waits.Load(), m.timeouts.Load()
	s.Sessions.WaitDuration = time.Duration(m.waitNs.Load())
	if in := p.inst.Load(); in != nil {
		// Read without a lock: the numbers are each exact, together
		// approximate, as sql.DBStats'.
		s.Sessions.MaxSessions = cap(in.slots)
		s.Sessions.InUse = cap(in.slots) - len(in.slots)
		s.Sessions.Idle = len(in.idle)
		s.Sessions.Open = int(in.open.Load())
	}
	h.mu.Lock()
	s.LastError = h.lastErr
	for code, n := range h.byCode {
		s.ErrorsByCode[CodeName(code)] = n
	}
	h.mu.Unlock()
	return s
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
