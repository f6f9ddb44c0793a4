package hsm

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/miekg/pkcs11"
)

// The group's two pure decisions, tested directly: pick (which member the
// next attempt of an operation goes to) and retryable (whether an error on
// one member lets the operation be repeated on another). No HSM: a member
// here is its gate and its count of operations in flight, all that pick
// reads of it.

// decideMember describes one member of a decideKey.
type decideMember struct {
	state    State // the member's state; the zero value is StateHealthy
	inFlight int64 // the group's operations on the member now
	// The group key on the member: bound, a lookup of it running, the
	// member excluded for it (it holds another key), or binding failed
	// (failedGen and failedAgo: in which generation, how long ago).
	bound, binding, excluded bool
	failed                   bool
	failedGen                uint64
	failedAgo                time.Duration
}

// decideGen is the generation every member of a decideKey is in.
const decideGen = 3

// decideKey returns a group key over members as described, all in
// generation decideGen.
func decideKey(members ...decideMember) *groupKey {
	g := &Group{members: make([]*member, len(members))}
	k := &groupKey{g: g, at: make([]memberKey, len(members))}
	for i, d := range members {
		p := &Provider{gate: newGate()}
		p.gate.set(decideGen, d.state)
		m := &member{index: i, p: p}
		m.inFlight.Store(d.inFlight)
		g.members[i] = m
		mk := &k.at[i]
		if d.bound {
			mk.d.Store(&durable{})
		}
		mk.binding.Store(d.binding)
		if d.excluded {
			mk.excluded = errors.New("holds another key")
		}
		if d.failed {
			mk.failed, mk.failedGen, mk.failedAt = true, d.failedGen, time.Now().Add(-d.failedAgo)
		}
	}
	return k
}

// idle is a bound, healthy member with n operations in flight.
func idle(n int64) decideMember { return decideMember{bound: true, inFlight: n} }

func TestGroupPick(t *testing.T) {
	tests := []struct {
		name    string
		members []decideMember
		tried   []int // members the operation was already tried on
		want    []int // the acceptable picks; -1 for none
	}{
		{"the least loaded wins", []decideMember{idle(3), idle(1), idle(2)}, nil, []int{1}},
		{"equally least loaded: either", []decideMember{idle(2), idle(0), idle(0)}, nil, []int{1, 2}},
		{"tried members are skipped, however idle", []decideMember{idle(0), idle(0), idle(7)}, []int{0, 1}, []int{2}},
		{"every member tried: none", []decideMember{idle(0), idle(0)}, []int{0, 1}, []int{-1}},
		{"members not healthy are skipped", []decideMember{
			{state: StateUnavailable, bound: true},
			{state: StateReinitializing, bound: true},
			{state: StateFailed, bound: true},
			{state: StateClosed, bound: true},
			idle(9),
		}, nil, []int{4}},
		{"no member healthy: none", []decideMember{
			{state: StateUnavailable, bound: true},
			{state: StateReinitializing, bound: true},
		}, nil, []int{-1}},
		{"unhealthy and tried skipped, then the least loaded", []decideMember{
			{state: StateUnavailable, bound: true}, idle(5), idle(2), idle(4),
		}, []int{2}, []int{3}},
		{"a member excluded for the key is skipped", []decideMember{{excluded: true}, idle(9)}, nil, []int{1}},
		{"only excluded members: none", []decideMember{{excluded: true}, {excluded: true}}, nil, []int{-1}},
		{"a member whose lookup of the key runs is skipped", []decideMember{{binding: true}, idle(9)}, nil, []int{1}},
		{"a member not yet bound may be bound", []decideMember{{}, idle(1)}, nil, []int{0}},
		{"binding failed in this generation just now: skipped", []decideMember{
			{failed: true, failedGen: decideGen}, idle(9),
		}, nil, []int{1}},
		{"binding failed in an earlier generation: asked again", []decideMember{
			{failed: true, failedGen: decideGen - 1}, idle(9),
		}, nil, []int{0}},
		{"binding failed rebindEvery ago: asked again", []decideMember{
			{failed: true, failedGen: decideGen, failedAgo: rebindEvery}, idle(9),
		}, nil, []int{0}},
		{"no members left of any kind: none", []decideMember{
			{state: StateFailed, bound: true}, {excluded: true}, {binding: true}, idle(0),
		}, []int{3}, []int{-1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			k := decideKey(tt.members...)
			var tried uint64
			for _, i := range tt.tried {
				tried |= 1 << i
			}
			// Several picks: the round robin's starting point must not
			// change which members are acceptable.
			for range 2 * len(tt.members) {
				got := k.pick(tried)
				if !slices.Contains(tt.want, got) {
					t.Fatalf("pick(tried %v) = %d, want one of %v", tt.tried, got, tt.want)
				}
			}
		})
	}
}

// TestGroupPickTakesTurns: equally loaded members take turns; a busier
// one gets none.
func TestGroupPickTakesTurns(t *testing.T) {
	k := decideKey(idle(1), idle(1), idle(1))
	count := make([]int, 3)
	for range 300 {
		count[k.pick(0)]++
	}
	if count[0] != 100 || count[1] != 100 || count[2] != 100 {
		t.Fatalf("300 picks among three equally loaded members: %v, want 100 each", count)
	}
	k = decideKey(idle(1), idle(1), idle(1), idle(4))
	count = make([]int, 4)
	for range 300 {
		count[k.pick(0)]++
	}
	if count[0] == 0 || count[1] == 0 || count[2] == 0 || count[3] != 0 {
		t.Fatalf("300 picks among three equally loaded members and a busier one: %v, want turns for the three, none for the busier", count)
	}
}

func TestGroupRetryable(t *testing.T) {
	code := func(c uint) error { return p11err("sign", 1, pkcs11.Error(c)) }
	sentinel := func(s error) error { return opErr("sign", 1, s, "on member 0") }
	tests := []struct {
		name string
		err  error
		want bool
	}{
		// The caller's: repeating it on another member fails the same way.
		{"invalid options", sentinel(ErrInvalidOptions), false},
		{"ciphertext rejected", sentinel(ErrDecryption), false},
		{"unsupported key", sentinel(ErrUnsupportedKey), false},
		{"caller's context cancelled", &Error{Op: "sign", Err: causedBy(ErrUnavailable, context.Canceled)}, false},
		{"caller's deadline passed", &Error{Op: "sign", Err: causedBy(ErrUnavailable, context.DeadlineExceeded)}, false},
		{"CKR_MECHANISM_INVALID", code(pkcs11.CKR_MECHANISM_INVALID), false},
		{"CKR_DATA_LEN_RANGE", code(pkcs11.CKR_DATA_LEN_RANGE), false},
		{"CKR_KEY_TYPE_INCONSISTENT", code(pkcs11.CKR_KEY_TYPE_INCONSISTENT), false},
		{"CKR_ENCRYPTED_DATA_INVALID", code(pkcs11.CKR_ENCRYPTED_DATA_INVALID), false},
		{"bare CKR_MECHANISM_PARAM_INVALID", pkcs11.Error(pkcs11.CKR_MECHANISM_PARAM_INVALID), false},

		// The member's: another member may do it.
		{"PIN refused by the member", code(pkcs11.CKR_PIN_INCORRECT), true},
		{"PIN locked on the member", code(pkcs11.CKR_PIN_LOCKED), true},
		{"CKR_DEVICE_ERROR", code(pkcs11.CKR_DEVICE_ERROR), true},
		{"CKR_TOKEN_NOT_PRESENT", code(pkcs11.CKR_TOKEN_NOT_PRESENT), true},
		{"CKR_CRYPTOKI_NOT_INITIALIZED", code(pkcs11.CKR_CRYPTOKI_NOT_INITIALIZED), true},
		{"CKR_SESSION_HANDLE_INVALID", code(pkcs11.CKR_SESSION_HANDLE_INVALID), true},
		{"CKR_GENERAL_ERROR", code(pkcs11.CKR_GENERAL_ERROR), true},
		{"CKR_KEY_HANDLE_INVALID", code(pkcs11.CKR_KEY_HANDLE_INVALID), true},
		{"CKR_OPERATION_ACTIVE", code(pkcs11.CKR_OPERATION_ACTIVE), true},
		{"unavailable", sentinel(ErrUnavailable), true},
		{"busy", sentinel(ErrBusy), true},
		{"hung", sentinel(ErrHung), true},
		{"drain timeout", sentinel(ErrDrainTimeout), true},
		{"stale key", sentinel(ErrStaleKey), true},
		{"closed member", sentinel(ErrClosed), true},
		{"another key on the member", sentinel(ErrKeyChanged), true},
		{"key gone from the member", sentinel(ErrKeyNotFound), true},
		{"key ambiguous on the member", sentinel(ErrAmbiguousKey), true},
		{"member became unavailable, last error a device loss", &Error{Op: "sign", Err: causedBy(wrapf(ErrUnavailable, "member 1 became unavailable during the call"), code(pkcs11.CKR_DEVICE_ERROR))}, true},
		{"an error of no known kind", fmt.Errorf("something else"), true},
	}
	for _, tt := range tests {
		if got := retryable(tt.err); got != tt.want {
			t.Errorf("%s: retryable(%v) = %v, want %v", tt.name, tt.err, got, tt.want)
		}
	}
}
