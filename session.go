package hsm

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/pkcs11"
)

// instance is everything that belongs to one generation of the PKCS#11
// library: the slot the token was found in, the logged-in session that keeps
// the login alive, and the pool of operation sessions. Handles stored here
// are meaningful only while the gate is at this generation; nothing of an
// instance is touched once the gate has moved on (no finalizers, no
// returning sessions to a newer pool).
type instance struct {
	gen   uint64
	ctx   *pkcs11.Ctx
	slot  uint
	token pkcs11.TokenInfo
	login pkcs11.SessionHandle

	// slots holds one token per session that may be borrowed; idle holds the
	// sessions opened and not borrowed. Both have capacity maxSessions, so
	// returning never blocks.
	slots chan struct{}
	idle  chan pkcs11.SessionHandle
	// closing is closed when the gate stops admitting this generation, to
	// wake operations waiting for a session.
	closing chan struct{}
	wait    time.Duration
	// lastDone is when a call of this generation last completed (unix
	// nanoseconds), to tell a hung HSM from a busy one.
	lastDone  atomic.Int64
	closeOnce sync.Once

	// oaepSoft records the OAEP parameter shapes (oaepShape) whose
	// CKM_RSA_PKCS_OAEP this token refused, to go straight to the software
	// decoding next time.
	oaepSoft sync.Map
}

func newInstance(ctx *pkcs11.Ctx, gen uint64, slot uint, token pkcs11.TokenInfo, login pkcs11.SessionHandle, maxSessions int, wait time.Duration) *instance {
	in := &instance{
		gen: gen, ctx: ctx, slot: slot, token: token, login: login,
		slots:   make(chan struct{}, maxSessions),
		idle:    make(chan pkcs11.SessionHandle, maxSessions),
		closing: make(chan struct{}),
		wait:    wait,
	}
	for range maxSessions {
		in.slots <- struct{}{}
	}
	in.lastDone.Store(time.Now().UnixNano())
	return in
}

// errClosing is returned by borrow when the generation stops being admitted
// while the operation waits for a session.
var errClosing = errors.New("generation closing")

// borrow returns a session for the exclusive use of one operation. It waits
// for a free one up to the instance's wait bound, and no longer than the
// generation lives. The caller must be admitted by the gate.
func (in *instance) borrow() (pkcs11.SessionHandle, error) {
	select {
	case <-in.slots:
	default:
		t := time.NewTimer(in.wait)
		select {
		case <-in.slots:
			t.Stop()
		case <-in.closing:
			t.Stop()
			return 0, errClosing
		case <-t.C:
			return 0, ErrBusy
		}
	}
	select {
	case s := <-in.idle:
		return s, nil
	default:
	}
	s, err := in.ctx.OpenSession(in.slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		in.slots <- struct{}{}
		return 0, err
	}
	return s, nil
}

// giveBack ends an operation's use of session s. opErr is the operation's
// error: a session whose state is in doubt is not pooled again.
func (in *instance) giveBack(s pkcs11.SessionHandle, opErr error) {
	in.lastDone.Store(time.Now().UnixNano())
	code, _ := CodeOf(opErr)
	switch {
	case code == pkcs11.CKR_SESSION_HANDLE_INVALID, code == pkcs11.CKR_SESSION_CLOSED,
		classifyCode(code) == ClassDeviceLost:
		// The library no longer knows this handle, and may already have
		// issued the same number to another session of ours: closing it
		// could close a session another goroutine is using. Forget it;
		// C_Finalize reclaims whatever is left.
	case code == pkcs11.CKR_OBJECT_HANDLE_INVALID, code == pkcs11.CKR_KEY_HANDLE_INVALID,
		classifyCode(code) == ClassNone,
		classifyCode(code) == ClassCaller && code != pkcs11.CKR_BUFFER_TOO_SMALL:
		// The session itself is fine (a failed C_*Init leaves no
		// operation active; a failed C_Sign/C_Decrypt ends it).
		in.idle <- s
	default:
		// The session is valid but its state is in doubt (operation
		// active, e.g. after CKR_BUFFER_TOO_SMALL; general failure): close
		// it, open a fresh one next time.
		_ = in.ctx.CloseSession(s)
	}
	in.slots <- struct{}{}
}
