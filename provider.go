// Package hsm makes private keys that live in a Hardware Security Module,
// reached through PKCS#11, usable as ordinary crypto.Signer and
// crypto.Decrypter values, and survives the loss of the HSM.
//
// When a network HSM loses every member, the PKCS#11 library does not
// recover by itself: every call fails (CKR_DEVICE_ERROR and friends) until
// the application calls C_Finalize and C_Initialize. After that, every
// session and object handle from before is meaningless, and the same numbers
// are handed out again, so a stale handle can reach a different key.
//
// This package owns the library's life cycle. Every key carries the
// generation of the library instance it was found in; Provider.Reinitialize
// drains the calls in flight, finalizes, initializes again and moves to the
// next generation; keys of an earlier generation then fail with ErrStaleKey
// without making any PKCS#11 call.
//
// A Provider must be the only user of its PKCS#11 module in the process:
// Open refuses a module that another live Provider, or other code, has
// initialized (ErrModuleInUse).
package hsm

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode"
	"unicode/utf8"
	"unsafe"

	"github.com/miekg/pkcs11"
	"golang.org/x/sync/singleflight"
)

// Defaults for the zero values of Config.
const (
	DefaultMaxSessions        = 32
	DefaultDrainTimeout       = 30 * time.Second
	DefaultSessionWaitTimeout = 10 * time.Second
)

// Config says which PKCS#11 module and token to use, and how.
type Config struct {
	// Path is the file name of the PKCS#11 module (shared library), e.g.
	// /usr/lib/softhsm/libsofthsm2.so.
	Path string

	// Exactly one of TokenLabel, TokenSerial and SlotNumber selects the
	// token. Prefer the label or the serial: slot numbers can change when
	// the library is re-initialized (HA groups, remoting renumber slots).
	TokenLabel  string
	TokenSerial string
	SlotNumber  *int

	// PIN is the user PIN. It is required unless NoLogin is set. It is
	// never printed by String or %v.
	PIN string
	// NoLogin skips C_Login, for tokens whose keys need none.
	NoLogin bool

	// MaxSessions bounds the number of sessions used for operations, and so
	// the number of goroutines that can be inside the PKCS#11 library at
	// once. Zero means DefaultMaxSessions. It is lowered to what the token
	// reports it supports.
	MaxSessions int

	// SessionWaitTimeout bounds how long an operation waits for a free
	// session when all MaxSessions are busy; then it fails with ErrBusy (and
	// the provider probes the HSM). An operation waiting for a session fails
	// at once with ErrUnavailable when the provider becomes unavailable.
	// Zero means DefaultSessionWaitTimeout.
	SessionWaitTimeout time.Duration

	// DrainTimeout bounds how long Reinitialize and Close wait for calls
	// already inside the PKCS#11 library to return before they finalize it.
	// It should be longer than the HSM's own command timeout (20 s for
	// Luna). Zero means DefaultDrainTimeout.
	DrainTimeout time.Duration

	// Logger receives state changes (HSM lost, re-initialized, failed),
	// never a line per failed operation; failed re-initializations are
	// logged at most once a minute. Nil means no logging.
	Logger *slog.Logger

	// ProbeInterval is how often the provider checks, while healthy, that
	// the token is present with the same serial and still logged in. An
	// operation that fails with a suspect code (see Classify) triggers a
	// probe at once. Zero means DefaultProbeInterval; negative disables the
	// periodic probe (suspect codes still trigger one).
	ProbeInterval time.Duration
	// ProbeTimeout is how long the HSM may stay silent before the provider
	// decides that it hangs (ErrHung) and becomes unavailable: a probe
	// without an answer, or calls inside the library while none completes
	// (a watchdog looks every ProbeTimeout/10, at most every 500ms, so a
	// frozen HSM under load is noticed within ProbeTimeout plus that). It
	// also bounds each of the provider's own conversations with the module:
	// C_Initialize to C_Login at Open and at each re-initialization,
	// C_Finalize, and C_Logout with C_Finalize at Close. Such a call that
	// does not return in time fails with ErrHung and is left to return when
	// the module lets it; no other of these calls starts until it has.
	// Zero means DefaultProbeTimeout.
	ProbeTimeout time.Duration

	// DisableAutoRecovery stops the provider from re-initializing by itself
	// when it becomes unavailable; call Reinitialize instead.
	DisableAutoRecovery bool
	// RecoveryBackoffMin and RecoveryBackoffMax bound the wait between two
	// automatic re-initializations that fail: it starts at the minimum and
	// doubles up to the maximum, with jitter. Zero means
	// DefaultRecoveryBackoffMin and DefaultRecoveryBackoffMax; the maximum
	// is how late, at worst, recovery notices that the HSM is back.
	RecoveryBackoffMin, RecoveryBackoffMax time.Duration

	// OnStateChange, if set, is called for every change of State, in order,
	// from a goroutine of the provider (never with a lock held: it may call
	// the provider, Reinitialize and Close included). A slow callback does
	// not slow the provider; changes it falls behind on are counted in
	// Stats.EventsDropped. Close waits for a running callback, except when
	// called from inside it.
	OnStateChange func(StateChange)
}

// String describes the configuration without the PIN.
func (c Config) String() string {
	sel := "no token selector"
	switch {
	case c.TokenLabel != "":
		sel = fmt.Sprintf("token label %q", c.TokenLabel)
	case c.TokenSerial != "":
		sel = fmt.Sprintf("token serial %q", c.TokenSerial)
	case c.SlotNumber != nil:
		sel = fmt.Sprintf("slot %d", *c.SlotNumber)
	}
	pin := "no PIN"
	if c.PIN != "" {
		pin = "PIN set"
	}
	return fmt.Sprintf("hsm.Config{module %q, %s, %s}", c.Path, sel, pin)
}

// GoString is String, so that %#v does not print the PIN either.
func (c Config) GoString() string { return c.String() }

// Format makes every verb print String, so that %+v does not print the PIN.
func (c Config) Format(f fmt.State, verb rune) { _, _ = io.WriteString(f, c.String()) }

func (c *Config) validate() error {
	var sel []string
	if c.TokenLabel != "" {
		sel = append(sel, "TokenLabel")
	}
	if c.TokenSerial != "" {
		sel = append(sel, "TokenSerial")
	}
	if c.SlotNumber != nil {
		sel = append(sel, "SlotNumber")
	}
	switch {
	case c.Path == "":
		return fmt.Errorf("%w: Path (the PKCS#11 module) is empty", ErrConfig)
	case len(sel) == 0:
		return fmt.Errorf("%w: no token selector: set exactly one of TokenLabel, TokenSerial, SlotNumber", ErrConfig)
	case len(sel) > 1:
		return fmt.Errorf("%w: %d token selectors (%v): set exactly one", ErrConfig, len(sel), sel)
	case c.SlotNumber != nil && *c.SlotNumber < 0:
		return fmt.Errorf("%w: SlotNumber %d is negative", ErrConfig, *c.SlotNumber)
	case c.PIN == "" && !c.NoLogin:
		return fmt.Errorf("%w: PIN is empty (set NoLogin for tokens that need no login)", ErrConfig)
	case c.PIN != "" && checkPIN(c.PIN) != nil:
		return fmt.Errorf("%w: %w", ErrConfig, checkPIN(c.PIN))
	case c.MaxSessions < 0:
		return fmt.Errorf("%w: MaxSessions %d is negative", ErrConfig, c.MaxSessions)
	case c.DrainTimeout < 0 || c.SessionWaitTimeout < 0 || c.ProbeTimeout < 0 || c.RecoveryBackoffMin < 0 || c.RecoveryBackoffMax < 0:
		return fmt.Errorf("%w: negative timeout", ErrConfig)
	}
	orDefault(&c.MaxSessions, DefaultMaxSessions)
	orDefault(&c.DrainTimeout, DefaultDrainTimeout)
	orDefault(&c.SessionWaitTimeout, DefaultSessionWaitTimeout)
	orDefault(&c.ProbeInterval, DefaultProbeInterval)
	orDefault(&c.ProbeTimeout, DefaultProbeTimeout)
	orDefault(&c.RecoveryBackoffMin, DefaultRecoveryBackoffMin)
	orDefault(&c.RecoveryBackoffMax, DefaultRecoveryBackoffMax)
	if c.RecoveryBackoffMax < c.RecoveryBackoffMin {
		return fmt.Errorf("%w: RecoveryBackoffMax %v is below RecoveryBackoffMin %v", ErrConfig, c.RecoveryBackoffMax, c.RecoveryBackoffMin)
	}
	return nil
}

// checkPIN refuses a PIN no token has, before it costs a login attempt:
// PKCS#11 PINs are UTF-8 text, so invalid UTF-8, a NUL byte or another
// control character (a line end read from a file, a byte of /dev/zero), or
// an invisible format or separator character (a byte-order mark, U+2028)
// is a mistake. The error does not show the PIN.
func checkPIN(pin string) error {
	if !utf8.ValidString(pin) {
		return errors.New("the PIN is not valid UTF-8")
	}
	for i, r := range pin {
		switch {
		case unicode.IsControl(r):
			return fmt.Errorf("the PIN has control character %U at byte %d", r, i)
		case unicode.In(r, unicode.Cf, unicode.Zl, unicode.Zp):
			return fmt.Errorf("the PIN has invisible character %U at byte %d", r, i)
		}
	}
	return nil
}

// orDefault sets *v to def when it is the zero value.
func orDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// Modules are loaded once per process and never unloaded: a dlclose'd
// miekg/pkcs11 context crashes on use, a finalized one only returns
// CKR_CRYPTOKI_NOT_INITIALIZED. owned says whether a live Provider holds it.
var modules = struct {
	sync.Mutex
	m map[string]*module
}{m: map[string]*module{}}

type module struct {
	ctx   *pkcs11.Ctx
	owned bool
	// closing: the owner was closed (or failed to open) and waits for
	// calls into the module to return before it releases it.
	closing bool
}

// claimModule loads (once) and claims the module at path for one Provider.
func claimModule(path string) (string, *pkcs11.Ctx, error) {
	abs, err := filepath.Abs(path)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return "", nil, fmt.Errorf("%w: module %q: %w", ErrConfig, path, err)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return "", nil, fmt.Errorf("%w: module %q: %w", ErrConfig, path, err)
	}
	if !fi.Mode().IsRegular() {
		return "", nil, fmt.Errorf("%w: module %q is not a regular file", ErrConfig, path)
	}
	modules.Lock()
	defer modules.Unlock()
	m := modules.m[abs]
	switch {
	case m != nil && m.owned && m.closing:
		return "", nil, fmt.Errorf("%w: %s is still held by a closed Provider: PKCS#11 calls of it have not returned (a frozen HSM); it is finalized and released when they do", ErrModuleInUse, abs)
	case m != nil && m.owned:
		return "", nil, fmt.Errorf("%w: %s is owned by another open Provider", ErrModuleInUse, abs)
	}
	if m == nil {
		ctx := pkcs11.New(abs)
		if ctx == nil {
			return "", nil, fmt.Errorf("%w: %s could not be loaded as a PKCS#11 module (not a shared library exporting C_GetFunctionList?)", ErrConfig, abs)
		}
		m = &module{ctx: ctx}
		modules.m[abs] = m
	}
	m.owned = true
	return abs, m.ctx, nil
}

func releaseModule(abs string) {
	modules.Lock()
	defer modules.Unlock()
	if m := modules.m[abs]; m != nil {
		m.owned, m.closing = false, false
	}
}

// closingModule records that the owner of the module at abs is closing.
func closingModule(abs string) {
	modules.Lock()
	defer modules.Unlock()
	if m := modules.m[abs]; m != nil {
		m.closing = true
	}
}

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

	// life serializes state changes: re-initialization and Close. Its
	// holder waits for nothing unbounded: every wait under it ends at a
	// timeout, or when Close closes health.stop.
	life sync.Mutex
	// serial is the serial number of the token found at Open; a later
	// generation must find the same token. Written once by Open.
	serial string

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

	flights singleflight.Group
	reinits atomic.Uint64
	health  health

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
	if err := cfg.validate(); err != nil {
		return nil, &Error{Op: "open", Err: err}
	}
	abs, ctx, err := claimModule(cfg.Path)
	if err != nil {
		return nil, &Error{Op: "open", Err: err}
	}
	p := &Provider{cfg: cfg, modPath: abs, ctx: ctx, gate: newGate(), log: cfg.Logger,
		modBusy: make(chan struct{}, 1), drained: make(chan struct{}), finished: make(chan struct{})}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	p.health.init()
	if fl, why := fastList(ctx, abs); fl != nil {
		p.fast = fl
	} else {
		p.log.Info("hsm: signing and decrypting through miekg/pkcs11 (3 calls per operation, not 2)", "module", abs, "check", why)
	}
	var in *instance
	err = p.inModule("open", 1, "C_Initialize to C_Login", nil, func() (err error) {
		in, err = p.start(1)
		return err
	})
	if err != nil {
		if errors.Is(err, ErrHung) {
			closingModule(abs)
			go p.finish() // finalizes and releases the module when the call returns
		} else {
			releaseModule(abs)
		}
		return nil, err
	}
	p.serial = in.token.SerialNumber
	p.inst.Store(in)
	p.gate.set(1, StateHealthy)
	if cfg.OnStateChange != nil {
		p.health.events = make(chan StateChange, 256)
		p.health.notifyDone = make(chan struct{})
		go p.notify()
	}
	go p.monitor()
	return p, nil
}

// moduleCall is a life cycle call in progress.
type moduleCall struct {
	what  string
	since time.Time
}

// inModule runs f, PKCS#11 calls the provider makes on its own to the
// module's life cycle, in a goroutine, and waits for it up to
// Config.ProbeTimeout, or until stop is closed (errStopped). A call that
// does not return in time fails with ErrHung and is left to return when the
// module lets it; until then inModule fails at once with ErrHung and starts
// nothing, so that no second C_Finalize or C_Initialize enters a module that
// has not returned from the first.
func (p *Provider) inModule(op string, gen uint64, what string, stop <-chan struct{}, f func() error) error {
	select {
	case <-stop:
		return errStopped // Close has begun: start nothing
	default:
	}
	select {
	case p.modBusy <- struct{}{}:
	default:
		return p.stuckError(op, gen)
	}
	p.modCall.Store(&moduleCall{what: what, since: time.Now()})
	done := make(chan error, 1)
	go func() { // owned by the module: it returns when f's calls do
		err := f()
		p.modCall.Store(nil)
		<-p.modBusy
		done <- err
	}()
	t := time.NewTimer(p.cfg.ProbeTimeout)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		return &Error{Op: op, Generation: gen,
			Err: fmt.Errorf("%w: %s did not return in %v (ProbeTimeout); nothing else enters the module until it does", ErrHung, what, p.cfg.ProbeTimeout)}
	case <-stop:
		return errStopped
	}
}

// stuckError says which life cycle call has not returned.
func (p *Provider) stuckError(op string, gen uint64) error {
	return &Error{Op: op, Generation: gen, Err: fmt.Errorf("%w: %s has not returned; nothing else enters the module until it does", ErrHung, p.stuckCall("an earlier call"))}
}

// stuckCall describes the life cycle call in progress, or returns none.
func (p *Provider) stuckCall(none string) string {
	if c := p.modCall.Load(); c != nil {
		return fmt.Sprintf("%s (%v ago)", c.what, time.Since(c.since).Round(time.Millisecond))
	}
	return none
}

// start initializes the library and sets up generation gen. On failure the
// library is left finalized. Called through inModule.
func (p *Provider) start(gen uint64) (*instance, error) {
	op := "open"
	if gen > 1 {
		op = "reinitialize"
	}
	if err := p.ctx.Initialize(); err != nil {
		if code, _ := CodeOf(err); code == pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED {
			return nil, &Error{Op: op, Code: code, Generation: gen,
				Err: fmt.Errorf("%w: %s was initialized by other code in this process (%w)", ErrModuleInUse, p.modPath, err)}
		}
		return nil, p11err(op, gen, fmt.Errorf("C_Initialize: %w", err))
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
	login, err := p.ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return nil, p11err("open session", gen, err)
	}
	if !p.cfg.NoLogin {
		if n, lo, hi := len(p.cfg.PIN), token.MinPinLen, token.MaxPinLen; hi != 0 && hi != pkcs11.CK_UNAVAILABLE_INFORMATION && hi >= lo &&
			(uint64(n) < uint64(lo) || uint64(n) > uint64(hi)) {
			return nil, &Error{Op: "login", Generation: gen,
				Err: fmt.Errorf("%w: the PIN has %d bytes and the token takes %d to %d; not sent, so that it costs no login attempt", ErrPIN, n, lo, hi)}
		}
		err := p.ctx.Login(login, pkcs11.CKU_USER, p.cfg.PIN)
		// Already logged in cannot come from a PIN we did not check: this
		// Provider initialized the library itself, moments ago.
		if code, _ := CodeOf(err); err != nil && code != pkcs11.CKR_USER_ALREADY_LOGGED_IN {
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
	return newInstance(p.ctx, gen, slot, token, login, maxSessions), nil
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
			if code, _ := CodeOf(err); code == pkcs11.CKR_TOKEN_NOT_PRESENT || code == pkcs11.CKR_TOKEN_NOT_RECOGNIZED {
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
		if code, _ := CodeOf(err); code != pkcs11.CKR_BUFFER_TOO_SMALL {
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

// finalize calls C_Finalize if the library is initialized. Called through
// inModule (or with modBusy held) and nothing in flight.
func (p *Provider) finalize() {
	if !p.initialized {
		return
	}
	if err := p.ctx.Finalize(); err != nil {
		p.log.Warn("hsm: C_Finalize failed", "module", p.modPath, "err", err)
	}
	p.initialized = false
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

// TokenInfo returns the label, serial, model and manufacturer of the token as
// found by the current generation. It makes no PKCS#11 call.
func (p *Provider) TokenInfo() (label, serial, model, manufacturer string) {
	in := p.inst.Load()
	if in == nil {
		return "", "", "", ""
	}
	return in.token.Label, in.token.SerialNumber, in.token.Model, in.token.ManufacturerID
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
// an OnStateChange callback, Close delivers the changes already queued and
// waits for the callback to return, within the same bound, except when
// Close is called from inside the callback: then it returns without
// waiting for the callback (its caller), and no callback starts after that
// one. Safe for concurrent use.
func (p *Provider) Close() error {
	start := time.Now()
	h := &p.health
	fromCallback := h.events != nil && h.notifier.Load() == goid()
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
	p.closeEvents(fromCallback)

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
	if h.events != nil && !fromCallback {
		t.Reset(p.cfg.DrainTimeout + p.cfg.ProbeTimeout - time.Since(start))
		select {
		case <-h.notifyDone:
		case <-t.C:
		}
	}
	return err
}

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
			Err: fmt.Errorf("%w: %d calls still inside the PKCS#11 library after %v; %s", ErrDrainTimeout, p.gate.inFlight(), p.cfg.DrainTimeout, released)}
	}
	return &Error{Op: "close", Generation: gen,
		Err: fmt.Errorf("%w: %s has not returned; %s", ErrHung, p.stuckCall("C_Logout and C_Finalize of Close"), strings.Replace(released, "they return", "it does", 1))}
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
	p.modCall.Store(nil)
	<-p.modBusy
	releaseModule(p.modPath)
	close(p.finished)
}
