package hsm

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// Pure-Go tests of the concurrency primitives; the real-parts suite is the
// integration gate.

// TestGateDrain: goroutines enter and exit the gate as fast as they can;
// the gate is closed and drained. Once drain has returned, no operation is
// inside and none gets in, and none admitted for generation 1 ever
// overlapped the end of the drain.
func TestGateDrain(t *testing.T) {
	for round := range 10 {
		g := newGate()
		g.set(1, StateHealthy)
		var inside, afterDrain atomic.Int64
		var drained atomic.Bool
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					if ok, _ := g.enter(1); ok {
						inside.Add(1)
						if drained.Load() {
							afterDrain.Add(1)
						}
						inside.Add(-1)
						g.exit()
					}
				}
			})
		}
		time.Sleep(time.Millisecond)
		g.set(1, StateReinitializing)
		if err := g.drain(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		drained.Store(true)
		if n := inside.Load(); n != 0 {
			t.Fatalf("round %d: %d operations inside after drain", round, n)
		}
		time.Sleep(time.Millisecond)
		close(stop)
		wg.Wait()
		if n := afterDrain.Load(); n != 0 {
			t.Fatalf("round %d: %d operations admitted after the drain", round, n)
		}
	}
}

// TestGateDrainBounded: drain returns at its context's end, or at stop,
// while an operation stays inside.
func TestGateDrainBounded(t *testing.T) {
	g := newGate()
	g.set(1, StateHealthy)
	if ok, _ := g.enter(1); !ok {
		t.Fatal("not admitted")
	}
	g.set(1, StateReinitializing)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if err := g.drain(ctx, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("drain with a call inside: %v", err)
	}
	stop := make(chan struct{})
	close(stop)
	if err := g.drain(context.Background(), stop); err != errStopped {
		t.Fatalf("drain after stop: %v", err)
	}
	g.exit()
	if err := g.drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
}

// TestGateRefusals: a refusal names the cause: closed, stale, unavailable.
func TestGateRefusals(t *testing.T) {
	g := newGate()
	r := newRefusals("sign", 1)
	for _, tt := range []struct {
		gen   uint64
		state State
		want  error
	}{
		{1, StateUnavailable, ErrUnavailable},
		{1, StateReinitializing, ErrUnavailable},
		{1, StateFailed, ErrUnavailable},
		{2, StateHealthy, ErrStaleKey},
		{2, StateUnavailable, ErrStaleKey},
		{1, StateClosed, ErrClosed},
		{3, StateClosed, ErrClosed},
	} {
		g.set(tt.gen, tt.state)
		ok, w := g.enter(1)
		if ok {
			t.Fatalf("admitted in generation %d, %v", tt.gen, tt.state)
		}
		if err := r.pick(1, w); !errors.Is(err, tt.want) {
			t.Errorf("generation %d, %v: %v, want %v", tt.gen, tt.state, err, tt.want)
		}
	}
	g.set(1, StateHealthy)
	if ok, _ := g.enter(1); !ok {
		t.Fatal("not admitted when healthy in its generation")
	}
	g.exit()
}

// TestFateOf: which sessions go back to the pool.
func TestFateOf(t *testing.T) {
	for _, tt := range []struct {
		code uint
		left left
		want fate
	}{
		{0, leftClean, pool},
		{pkcs11.CKR_MECHANISM_INVALID, leftClean, pool},            // a failed C_SignInit
		{pkcs11.CKR_KEY_HANDLE_INVALID, leftClean, pool},           // the key, not the session
		{pkcs11.CKR_DATA_LEN_RANGE, leftActive, closeIt},           // a failed C_Sign
		{pkcs11.CKR_ARGUMENTS_BAD, leftActive, closeIt},            // SoftHSM: operation still active
		{pkcs11.CKR_BUFFER_TOO_SMALL, leftActive, closeIt},         // operation active by the standard
		{pkcs11.CKR_GENERAL_ERROR, leftRejected, closeIt},          // a rejected ciphertext
		{0, leftActive, closeIt},                                   // a panic in the task
		{pkcs11.CKR_GENERAL_ERROR, leftClean, closeIt},             // state in doubt
		{pkcs11.CKR_OPERATION_ACTIVE, leftClean, closeIt},          // someone left one active
		{pkcs11.CKR_SESSION_HANDLE_INVALID, leftClean, forget},     // the number may be another's now
		{pkcs11.CKR_SESSION_CLOSED, leftActive, forget},            //
		{pkcs11.CKR_DEVICE_ERROR, leftActive, forget},              // finalize reclaims it
		{pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED, leftClean, forget},   //
		{pkcs11.CKR_TOKEN_NOT_PRESENT, leftClean, forget},          //
		{pkcs11.CKR_USER_NOT_LOGGED_IN, leftClean, closeIt},        // suspect
		{pkcs11.CKR_PIN_INCORRECT, leftClean, pool},                // caller
		{pkcs11.CKR_OBJECT_HANDLE_INVALID, leftActive, closeIt},    // after C_SignInit succeeded
		{pkcs11.CKR_ENCRYPTED_DATA_INVALID, leftRejected, closeIt}, //
	} {
		if got := fateOf(tt.code, tt.left); got != tt.want {
			t.Errorf("fateOf(%s, %d) = %d, want %d", CodeName(tt.code), tt.left, got, tt.want)
		}
	}
}

// TestMarkLostOnce: many goroutines see a device loss in generation 1 at
// once; exactly one state change happens, and it is announced once, with
// the first cause. A loss seen in an older generation changes nothing.
func TestMarkLostOnce(t *testing.T) {
	p := &Provider{gate: newGate(), log: slog.New(slog.DiscardHandler)}
	p.health.init()
	p.health.events = newNotifier(func(StateChange) {}) // not started: the changes stay queued
	p.gate.set(1, StateHealthy)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range 64 {
		wg.Go(func() {
			<-start
			p.markLost(1, &Error{Op: "sign", Code: pkcs11.CKR_DEVICE_ERROR, Generation: 1, Err: pkcs11.Error(pkcs11.CKR_DEVICE_ERROR)})
		})
	}
	close(start)
	wg.Wait()
	if gen, st := p.gate.load(); gen != 1 || st != StateUnavailable {
		t.Fatalf("gate at generation %d, %v", gen, st)
	}
	if n := len(p.health.events.queue); n != 1 {
		t.Fatalf("%d state changes announced, want 1", n)
	}
	ev := <-p.health.events.queue
	if ev.From != StateHealthy || ev.To != StateUnavailable || ev.Generation != 1 || !errors.Is(ev.Err, ErrDeviceLost) {
		t.Fatalf("event %+v", ev)
	}
	if !errors.Is(p.LastError(), ErrDeviceLost) {
		t.Fatalf("last error %v", p.LastError())
	}
	// Generation 2 is healthy; a late loss of generation 1 changes nothing.
	p.gate.set(2, StateHealthy)
	p.markLost(1, errors.New("late"))
	if _, st := p.gate.load(); st != StateHealthy || len(p.health.events.queue) != 0 {
		t.Fatalf("a late loss of an old generation changed the state to %v", st)
	}
}
