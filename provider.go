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
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"
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
	// session when all MaxSessions are busy; then it fails with ErrBusy.
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
	// ProbeTimeout bounds a probe; a probe without an answer, or no call
	// completing for this long while every session is busy, means the HSM
	// hangs and the provider becomes unavailable. Zero means
	// DefaultProbeTimeout.
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
	// the provider). A slow callback does not slow the provider; changes
	// it falls behind on are counted in Stats.EventsDropped.
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
	if m != nil && m.owned {
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
		m.owned = false
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

	// life serializes state changes: re-initialization and Close.
	life sync.Mutex
	// initialized says whether C_Initialize has been called without a
	// matching C_Finalize. Guarded by life.
	initialized bool
	// serial is the serial number of the token found at Open; a later
	// generation must find the same token. Guarded by life.
	serial string
	// closeDone is set once Close has finalized. Guarded by life.
	closeDone bool

	flights singleflight.Group
	reinits atomic.Uint64
	health  health

	// testHookFinalized, if set, runs inside a re-initialization right
	// after C_Finalize and before C_Initialize. Tests use it to change the
	// token while the library is down.
	testHookFinalized func()
}

// Open loads the PKCS#11 module, initializes it, finds the token, logs in and
// returns a Provider in generation 1. It makes PKCS#11 calls and may block as
// long as the module does.
func Open(cfg Config) (*Provider, error) {
	if err := cfg.validate(); err != nil {
		return nil, &Error{Op: "open", Err: err}
	}
	abs, ctx, err := claimModule(cfg.Path)
	if err != nil {
		return nil, &Error{Op: "open", Err: err}
	}
	p := &Provider{cfg: cfg, modPath: abs, ctx: ctx, gate: newGate(), log: cfg.Logger}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	p.health.init()
	if fl, why := fastList(ctx, abs); fl != nil {
		p.fast = fl
	} else {
		p.log.Info("hsm: signing and decrypting through miekg/pkcs11 (3 calls per operation, not 2)", "module", abs, "check", why)
	}
	in, err := p.start(1)
	if err != nil {
		releaseModule(abs)
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

// start initializes the library and sets up generation gen. On failure the
// library is left finalized. Called with p.life held.
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
	return newInstance(p.ctx, gen, slot, token, login, maxSessions, p.cfg.SessionWaitTimeout), nil
}

func (p *Provider) findToken(gen uint64) (uint, pkcs11.TokenInfo, error) {
	const op = "find token"
	slots, err := p.ctx.GetSlotList(true)
	if err != nil {
		return 0, pkcs11.TokenInfo{}, p11err(op, gen, err)
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

// finalize calls C_Finalize if the library is initialized. Called with
// p.life held and nothing in flight.
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

// Close stops admitting operations (they fail with ErrClosed), waits up to
// Config.DrainTimeout for calls in flight, logs out and finalizes the
// library. If calls are still in flight after the timeout it returns an
// error wrapping ErrDrainTimeout without finalizing; call Close again later
// to finish. Once Close has returned nil, later calls return nil. Safe for
// concurrent use; it waits for a re-initialization in progress.
func (p *Provider) Close() error {
	p.stopBackground()
	p.life.Lock()
	defer p.life.Unlock()
	if p.closeDone {
		return nil
	}
	gen, st := p.gate.load()
	if st != StateClosed {
		p.setState(gen, StateClosed, nil)
	}
	if in := p.inst.Load(); in != nil {
		in.stop()
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.DrainTimeout)
	defer cancel()
	if err := p.gate.drain(ctx); err != nil {
		return &Error{Op: "close", Generation: gen,
			Err: fmt.Errorf("%w: %d calls in flight after %v", ErrDrainTimeout, p.gate.inFlight(), p.cfg.DrainTimeout)}
	}
	if in := p.inst.Load(); in != nil && p.initialized && !p.cfg.NoLogin {
		_ = p.ctx.Logout(in.login)
	}
	p.finalize()
	p.inst.Store(nil)
	p.closeDone = true
	releaseModule(p.modPath)
	p.closeEvents()
	return nil
}

// stop wakes the operations of this generation that wait for a session:
// the generation no longer admits operations. Safe to call more than once.
func (in *instance) stop() { in.closeOnce.Do(func() { close(in.closing) }) }
