package hsm

import (
	"context"
	"errors"
	"sync/atomic"
)

const stateBits = 8

// gate admits operations of one generation and counts them while they are
// inside the PKCS#11 library, so that a re-initialization can wait until
// none is before it calls C_Finalize.
//
// The generation and the state live in one atomic word, so that the hot path
// is one load and a compare: an operation of generation g is admitted only
// when the word equals g<<stateBits|StateHealthy.
type gate struct {
	word     atomic.Uint64
	inflight atomic.Int64
	// wake gets a token when the last operation leaves while the gate is
	// not healthy (someone may be draining).
	wake chan struct{}
}

func newGate() *gate { return &gate{wake: make(chan struct{}, 1)} }

func pack(gen uint64, s State) uint64 { return gen<<stateBits | uint64(s) }

func unpack(w uint64) (uint64, State) { return w >> stateBits, State(w & (1<<stateBits - 1)) }

// load returns the current generation and state.
func (g *gate) load() (uint64, State) { return unpack(g.word.Load()) }

// set publishes a new generation and state. Callers hold the provider's
// life mutex and health.mu; the only other writer is markLost, whose
// compare-and-swap (under health.mu) moves healthy to unavailable within
// one generation.
func (g *gate) set(gen uint64, s State) { g.word.Store(pack(gen, s)) }

// enter admits an operation of generation gen. On success the operation is
// counted in flight and must call exit exactly once. On failure it returns
// the word that refused it, for the caller to turn into the right error.
func (g *gate) enter(gen uint64) (ok bool, refused uint64) {
	want := pack(gen, StateHealthy)
	if w := g.word.Load(); w != want { // fast refusal: no write at all
		return false, w
	}
	g.inflight.Add(1)
	// Re-check after counting ourselves: a drainer that closed the gate
	// before our increment will see it, one that closes it after will see
	// our count and wait for us.
	if w := g.word.Load(); w != want {
		g.exit()
		return false, w
	}
	return true, 0
}

// exit ends an operation admitted by enter.
func (g *gate) exit() {
	if g.inflight.Add(-1) == 0 {
		if _, s := g.load(); s != StateHealthy {
			select {
			case g.wake <- struct{}{}:
			default:
			}
		}
	}
}

// drain waits until no operation is in flight. The gate must already refuse
// new ones (state not healthy). Several may wait at once: each passes the
// last exit's wake-up on. It returns ctx's error if ctx ends first,
// and errStopped if stop is closed first (nil stop: never).
func (g *gate) drain(ctx context.Context, stop <-chan struct{}) error {
	select {
	case <-stop:
		return errStopped
	default:
	}
	for g.inflight.Load() != 0 {
		select {
		case <-g.wake:
		case <-ctx.Done():
			return ctx.Err()
		case <-stop:
			return errStopped
		}
	}
	// Pass the wake-up on: another drain of this gate (a Close's, beside a
	// re-initialization's) may be waiting for the same last exit.
	select {
	case g.wake <- struct{}{}:
	default:
	}
	return nil
}

// errStopped: Close interrupted a wait of a re-initialization.
var errStopped = errors.New("interrupted by Close")

// admits reports whether an operation of generation gen would be admitted
// now, and otherwise the word that refuses it: a check before work that
// must not be done for an operation that will be refused.
func (g *gate) admits(gen uint64) (bool, uint64) {
	w := g.word.Load()
	return w == pack(gen, StateHealthy), w
}

// inFlight returns the number of operations currently admitted.
func (g *gate) inFlight() int64 { return g.inflight.Load() }

// refusals are the errors an operation op returns without a PKCS#11 call
// (or, for busy, after waiting for a session), built once per key and
// operation when the key is looked up, so that a refusal allocates nothing.
type refusals struct {
	op                               string
	lat                              opClass // the Stats.Latency the op counts in, for runOp
	closed, stale, unavailable, busy error
}

func newRefusals(op string, gen uint64) *refusals {
	lat := classLookup
	switch op {
	case "sign":
		lat = classSign
	case "decrypt":
		lat = classDecrypt
	case "prove key":
		lat = classCheck
	}
	return &refusals{
		op:          op,
		lat:         lat,
		closed:      &Error{Op: op, Generation: gen, Err: ErrClosed},
		stale:       &Error{Op: op, Generation: gen, Err: ErrStaleKey},
		unavailable: &Error{Op: op, Generation: gen, Err: ErrUnavailable},
		busy:        &Error{Op: op, Generation: gen, Err: ErrBusy},
	}
}

// latencyOf returns the latency class of an operation of kind run with r.
func (r *refusals) latencyOf(kind runKind) opClass {
	switch kind {
	case runOwn:
		return classCheck
	case runWrite:
		return classWrite
	}
	return r.lat
}

// pick returns the refusal for the gate word that refused an operation of
// generation gen.
func (r *refusals) pick(gen uint64, refused uint64) error {
	g, s := unpack(refused)
	switch {
	case s == StateClosed:
		return r.closed
	case g != gen:
		return r.stale
	default:
		return r.unavailable
	}
}
