package hsm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/miekg/pkcs11"
	"golang.org/x/sync/singleflight"
)

// Provider owns one PKCS#11 module and one token in it, and hands out keys
// that are valid for one generation of the library. All methods are safe for
// concurrent use.
type Provider struct {
	cfg     Config
	modPath string
	ctx     *pkcs11.Ctx
	log     *slog.Logger

	gate *gate
	inst atomic.Pointer[instance]
	// fast is the module's function list for two-call signatures and
	// decryptions (see fastsign.go), or nil to go through miekg/pkcs11.
	fast unsafe.Pointer
	// initArgs is Config.InitArgs in C memory, or nil; freed by finish,
	// after C_Finalize.
	initArgs unsafe.Pointer

	// serial is the serial number of the token found at Open; a later
	// generation must find the same token. Written once by Open.
	serial string
	// openErr is why generation 1 did not come up when a group member was
	// opened (see open), or nil. Written once by open.
	openErr error

	// life serializes re-initialization and Close: the gate's state moves
	// (setState) only with life held, except markLost's healthy to
	// unavailable. Its holder waits for nothing unbounded: every wait under
	// it ends at a timeout, or when Close closes health.stop.
	life sync.Mutex

	// modBusy holds a value while a goroutine of the provider is inside the
	// module's life cycle calls (C_Initialize to C_Login, C_Finalize,
	// C_Logout), which inModule bounds. A call that outlives its bound keeps
	// modBusy until it returns, and no other life cycle call starts until
	// then.
	modBusy chan struct{}
	// modCall describes the life cycle call in progress, for errors; nil
	// when none is.
	modCall atomic.Pointer[moduleCall]
	// initialized says whether C_Initialize has been called without a
	// matching C_Finalize. Guarded by modBusy.
	initialized bool

	// drained is closed when no operation is left inside the library after
	// Close; finished when Close's work is done: the library finalized, the
	// module released.
	drained, finished chan struct{}

	flights singleflight.Group // one re-initialization at a time, shared
	genSem  chan struct{}      // one GenerateKey at a time, so that its check for a free label holds
	// cutShort holds the GenerateKey calls, by label, whose outcome a loss
	// left unknown, for their retry to finish (lifecycle.go). Guarded by
	// genSem.
	cutShort map[string]*cutShort
	reinits  atomic.Uint64
	health   health
	meter    meter // session waits and latencies, for Stats

	// testHookFinalized, if set, runs inside a re-initialization right
	// after C_Finalize and before C_Initialize. Tests use it to change the
	// token while the library is down.
	testHookFinalized func()
}

// Open loads the PKCS#11 module, initializes it, finds the token, logs in and
// returns a Provider in generation 1. Its PKCS#11 calls are bounded by
// Config.ProbeTimeout: when they do not return in time, Open fails with
// ErrHung, and the module stays claimed (Open of it fails with
// ErrModuleInUse) until they return and the library is finalized.
func Open(cfg Config) (*Provider, error) {
	return open(cfg, false)
}

// open is Open. With late (a Group's member), a failure that a later
// attempt may not repeat, that is anything but ErrConfig and
// ErrModuleInUse, does not fail it: it returns the Provider in generation 1,
// unavailable, with the failure in p.openErr, and a nil error. Automatic
// recovery then brings it up when the HSM answers, as after a loss (the
// token's serial number is learnt then). A failure that retrying cannot
// cure (ErrPIN) leaves it in StateFailed instead, as recovery would.
func open(cfg Config, late bool) (*Provider, error) {
	if err := cfg.validate(); err != nil {
		return nil, &Error{Op: "open", Err: err}
	}
	abs, ctx, err := claimModule(cfg.Path)
	if err != nil {
		return nil, &Error{Op: "open", Err: err}
	}
	// p is not a named result: a call that does not return keeps using it
	// after open has returned.
	p := &Provider{cfg: cfg, modPath: abs, ctx: ctx, gate: newGate(), log: cfg.Logger,
		modBusy: make(chan struct{}, 1), genSem: make(chan struct{}, 1), drained: make(chan struct{}), finished: make(chan struct{})}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	if cfg.InitArgs != "" {
		p.initArgs = cString(cfg.InitArgs)
	}
	p.health.init()
	if fl, why := fastList(ctx, abs); fl != nil {
		p.fast = fl
	} else {
		p.log.Info("hsm: signing and decrypting through miekg/pkcs11 (3 calls per operation, not 2)", "module", abs, "because", why)
	}
	var in *instance
	err = p.inModule("open", 1, "C_Initialize to C_Login", nil, func() (err error) {
		in, err = p.start(1)
		return err
	})
	if err != nil && late && !errors.Is(err, ErrConfig) && !errors.Is(err, ErrModuleInUse) {
		// A call that did not return (ErrHung) keeps modBusy: recovery
		// fails at once until it returns, then finalizes what it left.
		st := StateUnavailable
		if errors.Is(err, ErrPIN) || errors.Is(err, ErrTokenChanged) {
			st = StateFailed
		}
		p.openErr = err
		p.startBackground(1, st, err)
		p.log.Warn("hsm: the HSM could not be opened; it is used once it answers", "module", abs, "state", st, "err", err)
		return p, nil
	}
	if err != nil {
		if errors.Is(err, ErrHung) {
			closingModule(abs)
			go p.finish() // finalizes and releases the module when the call returns
		} else {
			if p.initArgs != nil {
				freeC(p.initArgs) // start left the library finalized
			}
			releaseModule(abs)
		}
		return nil, err
	}
	p.serial = in.token.SerialNumber
	p.inst.Store(in)
	p.startBackground(1, StateHealthy, nil)
	return p, nil
}

// startBackground puts the new provider, not yet shared, in generation gen
// and state st (cause says why, for LastError), and starts the notifier
// and the monitor.
func (p *Provider) startBackground(gen uint64, st State, cause error) {
	p.health.events = newNotifier(p.cfg.OnStateChange)
	p.gate.set(gen, st) // the first state: no change to announce
	p.health.lastErr = cause
	p.health.events.start()
	go p.monitor()
}

// start initializes the library and sets up generation gen. On failure the
// library is left finalized. Called through inModule.
func (p *Provider) start(gen uint64) (*instance, error) {
	op := "open"
	if gen > 1 {
		op = "reinitialize"
	}
	var opts []pkcs11.InitializeOption
	if p.initArgs != nil {
		opts = append(opts, pkcs11.InitializeWithReserved(p.initArgs))
	}
	if err := p.ctx.Initialize(opts...); err != nil {
		if code, _ := codeOf(err); code == pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED {
			return nil, &Error{Op: op, Code: code, Generation: gen,
				Err: causedBy(wrapf(ErrModuleInUse, "%s was initialized by other code in this process", p.modPath), err)}
		}
		return nil, p11err(op, gen, stepErr("C_Initialize", err))
	}
	p.initialized = true
	in, err := p.setup(op, gen)
	if err != nil {
		p.finalize()
		return nil, err
	}
	return in, nil
}

func (p *Provider) setup(op string, gen uint64) (*instance, error) {
	slot, token, err := p.findToken(gen)
	if err != nil {
		return nil, err
	}
	if p.serial != "" && token.SerialNumber != p.serial {
		return nil, opErr(op, gen, ErrTokenChanged, "serial %q, expected %q", token.SerialNumber, p.serial)
	}
	// Read-only: it only keeps the login (a write-protected token refuses
	// read-write sessions); writes open read-write sessions of their own.
	login, err := p.ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		return nil, p11err("open session", gen, err)
	}
	if !p.cfg.NoLogin {
		if n, lo, hi := len(p.cfg.PIN), token.MinPinLen, token.MaxPinLen; hi != 0 && hi != pkcs11.CK_UNAVAILABLE_INFORMATION && hi >= lo &&
			(uint64(n) < uint64(lo) || uint64(n) > uint64(hi)) {
			return nil, &Error{Op: "login", Generation: gen,
				Err: wrapf(ErrPIN, "the PIN has %d bytes and the token takes %d to %d; not sent, so that it costs no login attempt", n, lo, hi)}
		}
		userType := p.cfg.UserType
		if userType == 0 {
			userType = pkcs11.CKU_USER
		}
		err := p.ctx.Login(login, userType, p.cfg.PIN)
		// Already logged in cannot come from a PIN we did not check: this
		// Provider initialized the library itself, moments ago.
		if code, _ := codeOf(err); err != nil && code != pkcs11.CKR_USER_ALREADY_LOGGED_IN {
			return nil, p11err("login", gen, err)
		}
		// Self-test: the session must now be a user session.
		si, err := p.ctx.GetSessionInfo(login)
		if err != nil {
			return nil, p11err("login", gen, err)
		}
		if si.State != pkcs11.CKS_RW_USER_FUNCTIONS && si.State != pkcs11.CKS_RO_USER_FUNCTIONS {
			return nil, &Error{Op: "login", Generation: gen, Code: pkcs11.CKR_USER_NOT_LOGGED_IN,
				Err: fmt.Errorf("C_Login succeeded but the session is not logged in (state %d): %w", si.State, pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN))}
		}
	}
	maxSessions := p.cfg.MaxSessions
	if n := token.MaxRwSessionCount; n != pkcs11.CK_UNAVAILABLE_INFORMATION && n != pkcs11.CK_EFFECTIVELY_INFINITE && n > 1 && uint64(n-1) < uint64(maxSessions) {
		maxSessions = int(n - 1)
	}
	return newInstance(p.ctx, p.fast, gen, slot, token, login, maxSessions, &p.meter), nil
}

func (p *Provider) findToken(gen uint64) (uint, pkcs11.TokenInfo, error) {
	const op = "find token"
	slots, err := slotList(p.ctx)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, p11err(op, gen, err)
	}
	if len(slots) == 0 {
		return 0, pkcs11.TokenInfo{}, opErr(op, gen, ErrTokenNotFound, "token not present: the module lists no slot with a token (looking for %s)", selectorText(p.cfg))
	}
	var found []uint
	var info pkcs11.TokenInfo
	for _, s := range slots {
		if p.cfg.SlotNumber != nil {
			if uint64(s) != uint64(*p.cfg.SlotNumber) {
				continue
			}
		}
		ti, err := p.ctx.GetTokenInfo(s)
		if err != nil {
			if code, _ := codeOf(err); code == pkcs11.CKR_TOKEN_NOT_PRESENT || code == pkcs11.CKR_TOKEN_NOT_RECOGNIZED {
				continue
			}
			return 0, pkcs11.TokenInfo{}, p11err(op, gen, err)
		}
		if (p.cfg.TokenLabel != "" && ti.Label != p.cfg.TokenLabel) ||
			(p.cfg.TokenSerial != "" && ti.SerialNumber != p.cfg.TokenSerial) {
			continue
		}
		found = append(found, s)
		info = ti
	}
	switch len(found) {
	case 0:
		return 0, info, opErr(op, gen, ErrTokenNotFound, "no token with a %s among %d slots", selectorText(p.cfg), len(slots))
	case 1:
		return found[0], info, nil
	}
	return 0, info, opErr(op, gen, ErrTokenNotFound, "%d tokens match %s: select by TokenSerial", len(found), selectorText(p.cfg))
}

// slotList returns the slots with a token present. miekg/pkcs11 asks for
// the count, then for that many slots; when the count is 0, p11-kit's
// client (0.24, 0.26) answers the second call with CKR_BUFFER_TOO_SMALL,
// and so does a module whose slot count grew in between. Asked again, a
// list that is still "too small" for its own count is empty.
func slotList(ctx *pkcs11.Ctx) ([]uint, error) {
	var err error
	for range 3 {
		var slots []uint
		if slots, err = ctx.GetSlotList(true); err == nil {
			return slots, nil
		}
		if code, _ := codeOf(err); code != pkcs11.CKR_BUFFER_TOO_SMALL {
			return nil, err
		}
	}
	return nil, nil
}

func selectorText(c Config) string {
	switch {
	case c.TokenLabel != "":
		return fmt.Sprintf("label %q", c.TokenLabel)
	case c.TokenSerial != "":
		return fmt.Sprintf("serial %q", c.TokenSerial)
	case c.SlotNumber != nil:
		return fmt.Sprintf("slot number %d", *c.SlotNumber)
	}
	return "no selector"
}

// Generation returns the current generation of the PKCS#11 library: 1 after
// Open, one more after each successful re-initialization. It never blocks.
func (p *Provider) Generation() uint64 {
	g, _ := p.gate.load()
	return g
}

// State returns whether the provider admits operations. It never blocks.
func (p *Provider) State() State {
	_, s := p.gate.load()
	return s
}

// TokenInfo describes the token a provider uses.
type TokenInfo struct {
	Label, Serial, Model, Manufacturer string
}

// TokenInfo describes the token as the current generation found it. It
// makes no PKCS#11 call; it is the zero TokenInfo once the provider is
// closed.
func (p *Provider) TokenInfo() TokenInfo {
	in := p.inst.Load()
	if in == nil {
		return TokenInfo{}
	}
	return TokenInfo{Label: in.token.Label, Serial: in.token.SerialNumber, Model: in.token.Model, Manufacturer: in.token.ManufacturerID}
}

// Close stops admitting operations (they fail with ErrClosed), waits for
// calls in flight, logs out, finalizes the library and releases the module
// for a later Open. It returns within Config.DrainTimeout plus
// Config.ProbeTimeout whatever the HSM does: up to DrainTimeout for the
// calls in flight, then up to ProbeTimeout for C_Logout and C_Finalize.
// When calls are still inside the library after DrainTimeout, it returns an
// error wrapping ErrDrainTimeout; when C_Logout or C_Finalize, or a
// re-initialization's C_Initialize or C_Finalize, has not returned, one
// wrapping ErrHung. Either says what was left behind: the library is
// finalized and the module released when those calls return, and until
// then Open of the module fails with ErrModuleInUse. Calling Close again
// waits once more, and returns nil once all is done; after Close has
// returned nil, it always does.
//
// Close interrupts a re-initialization in progress. When the provider has
// an OnStateChange callback, Close delivers the changes already queued,
// StateClosed last, and waits for the callback to return, within the same
// bound (a callback still running then is left to finish), except when
// Close is called from inside the callback: then it returns without
// waiting for the callback (its caller), and no callback starts after that
// one. Safe for concurrent use.
func (p *Provider) Close() error {
	start := time.Now()
	p.stopBackground() // stops the monitor; interrupts a re-initialization's waits
	p.life.Lock()
	gen, st := p.gate.load()
	if st != StateClosed {
		p.setState(gen, StateClosed, nil)
		if in := p.inst.Load(); in != nil {
			in.stop()
		}
		closingModule(p.modPath)
		go p.finish()
	}
	p.life.Unlock()
	p.health.events.close()

	t := time.NewTimer(p.cfg.DrainTimeout - time.Since(start))
	defer t.Stop()
	select {
	case <-p.drained:
		t.Reset(p.cfg.ProbeTimeout)
		select {
		case <-p.finished:
		case <-t.C:
		}
	case <-t.C:
	}
	err := p.closeResult(gen)
	p.health.events.wait(start.Add(p.cfg.closeBound()))
	return err
}

// closeBound bounds Close, whatever the HSM and OnStateChange do: up to
// DrainTimeout for the calls in flight, then up to ProbeTimeout for
// C_Logout and C_Finalize; the wait for the callback ends with them.
// Group.Close is bounded by the largest of its members'.
func (c *Config) closeBound() time.Duration { return c.DrainTimeout + c.ProbeTimeout }

// closeResult is what Close returns once its waits have ended: nil when
// its work is done, else what it left behind.
func (p *Provider) closeResult(gen uint64) error {
	const released = "the library is finalized and the module released when they return (until then Open of it fails with ErrModuleInUse)"
	select {
	case <-p.finished:
		return nil
	default:
	}
	select {
	case <-p.drained:
	default:
		return &Error{Op: "close", Generation: gen,
			Err: wrapf(ErrDrainTimeout, "%d calls still inside the PKCS#11 library after %v; %s", p.gate.inFlight(), p.cfg.DrainTimeout, released)}
	}
	return &Error{Op: "close", Generation: gen,
		Err: wrapf(ErrHung, "%s has not returned; %s", p.stuckCall("C_Logout and C_Finalize of Close"), strings.Replace(released, "they return", "it does", 1))}
}

// finish ends the provider's use of the module once nothing is inside it:
// it waits for the operations in flight and for a life cycle call that has
// not returned, logs out, finalizes, releases the module and closes
// p.finished. It runs in a goroutine of its own, started once, by Close or
// by an Open whose calls did not return, and waits as long as the module
// keeps those calls.
func (p *Provider) finish() {
	_ = p.gate.drain(context.Background(), nil)
	close(p.drained)
	p.modBusy <- struct{}{}
	p.modCall.Store(&moduleCall{what: "C_Logout and C_Finalize of Close", since: time.Now()})
	if in := p.inst.Load(); in != nil && p.initialized && !p.cfg.NoLogin {
		_ = p.ctx.Logout(in.login)
	}
	p.finalize()
	p.inst.Store(nil)
	if p.initArgs != nil {
		freeC(p.initArgs) // the module is finalized: it keeps nothing of it
		p.initArgs = nil
	}
	p.modCall.Store(nil)
	<-p.modBusy
	releaseModule(p.modPath)
	close(p.finished)
}
