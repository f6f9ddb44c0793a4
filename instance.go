package hsm

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

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
	epoch uint64 // the module's epoch (module.epoch) it was set up in
	ctx   *pkcs11.Ctx
	fast  unsafe.Pointer // the module's function list (fastsign.go), or nil
	slot  uint
	token pkcs11.TokenInfo
	login pkcs11.SessionHandle
	meter *meter // the provider's, for Stats

	// slots holds one token per session that may be borrowed; idle holds the
	// sessions opened and not borrowed. Both have capacity maxSessions, so
	// returning never blocks.
	slots chan struct{}
	idle  chan pkcs11.SessionHandle
	// closing is closed when the gate stops admitting this generation, to
	// wake operations waiting for a session.
	closing   chan struct{}
	closeOnce sync.Once

	// calls is the number of sessions borrowed, that is of operations inside
	// the PKCS#11 library or about to enter it; progress is when the library
	// last showed progress (unix nanoseconds): a call completed, or a call
	// entered an idle library. The monitor's watchdog reads both: calls
	// pending and no progress for Config.ProbeTimeout means the HSM hangs.
	calls    atomic.Int64
	progress atomic.Int64

	// open counts the operation sessions open: idle and borrowed.
	open atomic.Int64

	// strictAttrs is set when the module's answer to a partial attribute
	// read cannot be trusted: lookups then ask only for attributes each
	// object has (lookup.go).
	strictAttrs atomic.Bool
	// noAllowed is set when a private key read that way had no
	// CKA_ALLOWED_MECHANISMS: such lookups stop asking for it.
	noAllowed atomic.Bool

	// rawRefused is set when the token refused CKM_RSA_X_509 for a key of
	// this generation: PKCS #1 v1.5 decryption then goes through the token's
	// CKM_RSA_PKCS (see decryptPKCS1).
	rawRefused atomic.Bool
	// oaepSoft records the OAEP parameter shapes (oaepShape) whose
	// CKM_RSA_PKCS_OAEP this token refused, to go straight to the software
	// decoding next time.
	oaepSoft sync.Map
}

func newInstance(ctx *pkcs11.Ctx, fast unsafe.Pointer, gen uint64, slot uint, token pkcs11.TokenInfo, login pkcs11.SessionHandle, maxSessions int, m *meter) *instance {
	in := &instance{
		gen: gen, ctx: ctx, fast: fast, slot: slot, token: token, login: login, meter: m,
		slots:   make(chan struct{}, maxSessions),
		idle:    make(chan pkcs11.SessionHandle, maxSessions),
		closing: make(chan struct{}),
	}
	for range maxSessions {
		in.slots <- struct{}{}
	}
	in.progress.Store(time.Now().UnixNano())
	return in
}

// closeSessions closes the sessions of the instance, idle and login, when
// its Provider closes and the module stays initialized for others. Called
// once no operation of it is in flight, with the module busy.
func (in *instance) closeSessions() {
	for {
		select {
		case s := <-in.idle:
			_ = in.ctx.CloseSession(s)
			in.open.Add(-1)
		default:
			_ = in.ctx.CloseSession(in.login)
			return
		}
	}
}

// stop wakes the operations of this generation that wait for a session:
// the generation no longer admits operations. Safe to call more than once.
func (in *instance) stop() { in.closeOnce.Do(func() { close(in.closing) }) }

// errClosing is returned by borrow when the generation stops being admitted
// while the operation waits for a session.
var errClosing = errors.New("generation closing")

// borrow returns a session for the exclusive use of one operation of kind.
// It waits for a free slot up to wait, and no longer than the generation
// lives. The caller must be admitted by the gate, and must call giveBack
// exactly once when borrow succeeded; for runOwn, which takes a slot only
// (no session; the handle is 0), release. runOp gets a read-only session
// from the pool; runWrite a read-write session of its own, which giveBack
// closes.
func (in *instance) borrow(wait time.Duration, kind runKind) (pkcs11.SessionHandle, error) {
	select {
	case <-in.slots:
	default:
		start := time.Now()
		t := time.NewTimer(wait)
		select {
		case <-in.slots:
			t.Stop()
			in.meter.waited(start, false)
		case <-in.closing:
			t.Stop()
			in.meter.waited(start, false)
			return 0, errClosing
		case <-t.C:
			in.meter.waited(start, true)
			return 0, ErrBusy
		}
	}
	if in.calls.Load() == 0 {
		// The library was idle: progress is measured from now, not from
		// the last call before the pause. Stored before calls counts this
		// one, so that the watchdog never sees a call with the progress of
		// before the pause.
		in.progress.Store(time.Now().UnixNano())
	}
	in.calls.Add(1)
	flags := uint(pkcs11.CKF_SERIAL_SESSION)
	switch kind {
	case runOwn:
		return 0, nil
	case runWrite:
		flags |= pkcs11.CKF_RW_SESSION
	default:
		select {
		case s := <-in.idle:
			return s, nil
		default:
		}
	}
	s, err := in.ctx.OpenSession(in.slot, flags)
	if err != nil {
		in.release()
		return 0, err
	}
	in.open.Add(1)
	return s, nil
}

// release ends a borrow: the library made progress, the slot is free.
func (in *instance) release() {
	in.progress.Store(time.Now().UnixNano())
	in.calls.Add(-1)
	in.slots <- struct{}{}
}

// long runs f, a call that may rightly take longer than ProbeTimeout (a key
// generation), without counting it among the calls the watchdog watches:
// on its own, it is not a frozen HSM. The caller holds a borrow.
func (in *instance) long(f func()) {
	in.calls.Add(-1)
	defer func() {
		in.progress.Store(time.Now().UnixNano()) // before calls counts it again, as in borrow
		in.calls.Add(1)
	}()
	f()
}

// left says what an operation's calls may have left on its session.
type left uint8

const (
	// leftClean: no operation is active on the session (the calls
	// succeeded, or the one that failed started nothing, like a failed
	// C_SignInit).
	leftClean left = iota
	// leftActive: an operation may still be active. The standard says that
	// a failed C_Sign or C_Decrypt ends it, except CKR_BUFFER_TOO_SMALL,
	// but modules do not all keep that promise (SoftHSM 2.6 leaves the
	// operation active after CKR_ARGUMENTS_BAD), and the next user of the
	// session would fail with CKR_OPERATION_ACTIVE. The session is closed.
	leftActive
	// leftRejected: as leftActive, and the token rejected the data it was
	// given (a ciphertext): the error says nothing about the health of the
	// HSM and must not start a probe.
	leftRejected
)

// giveBack ends an operation's use of session s. err is the operation's
// error and l what its calls left on the session: a session whose state is
// in doubt is not pooled again.
func (in *instance) giveBack(s pkcs11.SessionHandle, err error, l left) {
	code, _ := codeOf(err)
	switch fateOf(code, l) {
	case pool:
		in.idle <- s
	case closeIt:
		_ = in.ctx.CloseSession(s)
		in.open.Add(-1)
	case forget:
		in.open.Add(-1)
	}
	in.release()
}

// fate is what becomes of a session after an operation.
type fate uint8

const (
	pool    fate = iota // nothing is active on it: pool it
	closeIt             // valid, but its state is in doubt: close it
	forget              // the library no longer knows it: leave it alone
)

// fateOf decides a session's fate from the operation's PKCS#11 code (0 for
// none) and what its calls left on it.
func fateOf(code uint, l left) fate {
	switch {
	case code == pkcs11.CKR_SESSION_HANDLE_INVALID, code == pkcs11.CKR_SESSION_CLOSED,
		classify(code) == classDeviceLost:
		// The library may already have issued the same number to another
		// session of ours: closing it could close a session another
		// goroutine is using. C_Finalize reclaims whatever is left.
		return forget
	case l == leftClean && (code == pkcs11.CKR_OBJECT_HANDLE_INVALID || code == pkcs11.CKR_KEY_HANDLE_INVALID ||
		classify(code) == classNone || classify(code) == classCaller):
		return pool
	}
	// An operation may be active (l is not leftClean), or the failure
	// leaves the session's state in doubt (a general error, an operation
	// left active by someone): a fresh session next time.
	return closeIt
}

// runKind says how run accounts for a task.
type runKind uint8

const (
	// runOp: an operation of the user (signature, decryption, lookup): it
	// counts in Stats.Operations and Refused, and gets a read-only session
	// from the pool.
	runOp runKind = iota
	// runOwn: the provider's own check (probe, URI match): it takes a slot
	// like an operation, so that calls inside the library never exceed
	// MaxSessions, but needs no session (the handle is 0) and is not
	// counted as an operation.
	runOwn
	// runWrite: an operation that changes the token (generate, import,
	// delete): a read-write session of its own, closed afterwards, so that
	// the pool holds read-only sessions only (write-protected tokens).
	runWrite
)

// task is an operation's work on a session of its generation: PKCS#11
// calls. An error after which an operation may still be active on the
// session comes wrapped by mayBeActive (or rejectedData); others leave it
// clean.
type task func(in *instance, s pkcs11.SessionHandle) error

// marked is an error with what it left on the session; run unwraps it.
type marked struct {
	err  error
	left left
}

func (m *marked) Error() string { return m.err.Error() }
func (m *marked) Unwrap() error { return m.err }

// mayBeActive marks err as a failure after which an operation may still be
// active on the session (a failed C_Sign, C_Decrypt, C_FindObjectsFinal).
func mayBeActive(err error) error { return &marked{err, leftActive} }

// rejectedData marks err as the token's rejection of the data of a
// C_Decrypt: the session is closed like mayBeActive's, and the error does
// not count against the HSM's health.
func rejectedData(err error) error { return &marked{err, leftRejected} }

// unmark returns the error a mark wraps, or err.
func unmark(err error) error {
	if m, ok := err.(*marked); ok {
		return m.err
	}
	return err
}

// run is the one path every operation of the provider takes, key
// operations, lookups, probes and URI checks alike. In order: the gate
// admits it for generation gen (a refusal is r's prebuilt error, without a
// PKCS#11 call); it borrows a session of that generation (waiting up to
// wait, no longer than the generation is admitted); it runs f; it gives
// the session back by what f left on it; and it accounts for the error (a
// device-loss code makes the provider unavailable, a suspect one starts a
// probe). Errors come back as *Error.
//
// f runs while the operation holds a session slot: it calls the module and
// nothing of the caller's (options, readers), so that slow or panicking
// user code cannot hold a session or look like a frozen HSM to the
// watchdog.
func (p *Provider) run(gen uint64, r *refusals, wait time.Duration, kind runKind, f task) error {
	if ok, w := p.gate.enter(gen); !ok {
		if kind == runOp {
			p.health.refused.Add(1)
		}
		return r.pick(gen, w)
	}
	defer p.gate.exit()
	if kind != runOwn {
		p.health.ops.Add(1)
	}
	start := time.Now()
	defer p.meter.took(r.latencyOf(kind), start)
	in := p.inst.Load() // gen's instance: the gate admitted gen
	s, err := in.borrow(wait, kind)
	if err != nil {
		switch err {
		case errClosing:
			return r.unavailable
		case ErrBusy:
			p.health.poke() // a full pool may be a frozen HSM: probe now
			return r.busy
		}
		p.observe(gen, err, true, kind != runOwn)
		if code, _ := codeOf(err); code == pkcs11.CKR_TOKEN_WRITE_PROTECTED {
			return &Error{Op: r.op, Code: code, Generation: gen, Err: causedBy(ErrWriteProtected, stepErr("C_OpenSession", err))}
		}
		return p11err(r.op, gen, stepErr("C_OpenSession", err))
	}
	returned := false
	defer func() {
		if !returned { // f panicked: what it left on the session is unknown
			if kind == runOwn {
				in.release()
			} else {
				in.giveBack(s, nil, leftActive)
			}
		}
	}()
	err = f(in, s)
	returned = true
	l := leftClean
	if m, ok := err.(*marked); ok {
		err, l = m.err, m.left
	}
	switch kind {
	case runOwn:
		in.release()
	case runWrite:
		in.giveBack(s, err, leftActive) // closed: the pool holds read-only sessions
	default:
		in.giveBack(s, err, l)
	}
	if err == nil {
		return nil
	}
	p.observe(gen, err, l != leftRejected, kind != runOwn)
	if _, ok := err.(*Error); ok {
		return err
	}
	return p11err(r.op, gen, err)
}
