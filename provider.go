package hsm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/miekg/pkcs11"
)

// Provider uses one token of a PKCS#11 module, and hands out keys that
// are valid for one generation of the library. Several Providers may share
// a module, on one token or on several: the module is initialized once for
// all of them, and re-initialized for all of them at once (see
// Reinitialize). All methods are safe for concurrent use.
type Provider struct {
	cfg Config
	mod *module
	ctx *pkcs11.Ctx
	log *slog.Logger

	gate *gate
	inst atomic.Pointer[instance]
	// fast is the module's function list for two-call signatures and
	// decryptions (see fastsign.go), or nil to go through miekg/pkcs11.
	fast unsafe.Pointer

	// serial is the serial number of the token found at Open; a later
	// generation must find the same token. Written once by Open, or by
	// the first re-initialization of a group member that Open could not
	// set up (under the module's life).
	serial string
	// openErr is why generation 1 did not come up when a group member was
	// opened (see open), or nil. Written once by open.
	openErr error

	// drained is closed when no operation is left inside the library after
	// Close; finished when Close's work is done: the Provider's sessions
	// closed, the token logged out when no other Provider uses it, the
	// library finalized when no other Provider uses the module.
	drained, finished chan struct{}
	// closedFrom and closedGen are the state and generation Close found:
	// Close ends the Provider's sessions by their numbers only when it was
	// healthy, or when a re-initialization set them up after it (see
	// finish). Written before finish starts.
	closedFrom State
	closedGen  uint64
	// joined is set once Open has set the Provider up (or, for a group
	// member, let it start unavailable), with its state and monitor: from
	// then on a re-initialization of the module takes it in. Guarded by
	// the module's life.
	joined bool

	// cutShort holds the GenerateKey calls, by label, whose outcome a loss
	// left unknown, for their retry to finish (lifecycle.go). Guarded by
	// the module's genSem.
	cutShort map[string]*cutShort
	reinits  atomic.Uint64
	health   health
	meter    meter // session waits and latencies, for Stats

	// testHookFinalized, if set, runs inside a re-initialization right
	// after C_Finalize and before C_Initialize. Tests use it to change the
	// token while the library is down.
	testHookFinalized func()
}

// Open loads the PKCS#11 module (once per process), initializes it unless
// another Provider of the process has, finds the token, logs in (unless
// another Provider of the process has logged the token in, with the same
// PIN) and returns a Provider in generation 1. Providers of one module,
// of one token or of several, share the module's life cycle: see
// Reinitialize and Close. Its PKCS#11 calls are bounded by
// Config.ProbeTimeout: when they do not return in time, Open fails with
// ErrHung, and nothing else enters the module until they return (when no
// other Provider is open on it, Open of it fails with ErrModuleInUse until
// then). It waits for a re-initialization of the module in progress, and
// for the end of the module's last Providers when they are closing, up to
// DrainTimeout plus ProbeTimeout each (ErrUnavailable, ErrModuleInUse).
//
// Two Providers of one token share its login, which PKCS#11 makes the
// application's: one with another PIN or user type than the Provider that
// logged the token in fails with ErrPIN, without sending its PIN (it would
// not be checked), so that it costs no login attempt and logs no one out.
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
	// p is not a named result: a call that does not return keeps using it
	// after open has returned.
	p := &Provider{cfg: cfg, gate: newGate(), log: cfg.Logger, drained: make(chan struct{}), finished: make(chan struct{})}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	p.health.init()
	m, err := claimModule(cfg, p)
	if err != nil {
		return nil, &Error{Op: "open", Err: err}
	}
	p.mod, p.ctx, p.fast = m, m.ctx, m.fast
	if p.fast == nil {
		p.log.Info("hsm: signing and decrypting through miekg/pkcs11 (3 calls per operation, not 2)", "module", m.path, "because", m.slow)
	}
	return m.attach(p, late)
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

// attach sets up generation 1 of p, a Provider attached to the module:
// C_Initialize unless another Provider has, then set-up; then p joins the
// module (its state, monitor and notifier start, and re-initializations of
// the module take it in), all under the module's life, so that no
// re-initialization sees p half set up. With late (a Group's member), a
// failure that a later attempt may not repeat, that is anything but
// ErrConfig and ErrModuleInUse, does not fail it: p joins in generation 1,
// unavailable, with the failure in p.openErr. Automatic recovery then
// brings it up when the HSM answers, as after a loss (the token's serial
// number is learnt then). A failure that retrying cannot cure (ErrPIN)
// leaves it in StateFailed instead, as recovery would. Otherwise a
// failure leaves nothing of p in the module, and the library finalized
// when no other Provider is attached.
func (m *module) attach(p *Provider, late bool) (*Provider, error) {
	const op = "open"
	if err := m.lock(time.Now().Add(p.cfg.DrainTimeout+p.cfg.ProbeTimeout), nil); err != nil {
		p.closedFrom = StateUnavailable
		m.closed()
		m.detach(p)
		return nil, &Error{Op: op, Generation: 1, Err: causedBy(ErrUnavailable, err)}
	}
	defer m.unlock()
	var in *instance
	err := m.inModule(op, 1, "C_Initialize to C_Login", p.cfg.ProbeTimeout, nil, func() (err error) {
		if !m.initialized {
			if err := m.initialize(op, 1); err != nil {
				return err
			}
		}
		if in, err = p.setup(op, 1); err != nil {
			if m.only(p) {
				m.finalize(p.log.Warn)
			}
			return err
		}
		p.inst.Store(in) // before open returns: a call that outlived its bound leaves in to finish
		return nil
	})
	switch {
	case err == nil:
		p.serial = in.token.SerialNumber
		p.startBackground(1, StateHealthy, nil)
		p.joined = true
		return p, nil
	case late && !errors.Is(err, ErrConfig) && !errors.Is(err, ErrModuleInUse):
		// A call that did not return (ErrHung) keeps the module busy:
		// recovery fails at once until it returns.
		st := StateUnavailable
		if errors.Is(err, ErrPIN) || errors.Is(err, ErrTokenChanged) {
			st = StateFailed
		}
		p.openErr = err
		p.startBackground(1, st, err)
		p.joined = true
		p.log.Warn("hsm: the HSM could not be opened; it is used once it answers", "module", m.path, "state", st, "err", err)
		return p, nil
	}
	// p's sessions, if any (a set-up that outlived its bound and returns
	// later), are the module's to reclaim: not "set up after Close".
	p.closedFrom, p.closedGen = StateUnavailable, 1
	m.closed()
	if errors.Is(err, ErrHung) {
		go p.finish() // ends p's use of the module when the call returns
	} else {
		m.detach(p) // nothing of p is in the module; under life, so that a finish deciding who is last sees it gone
	}
	return nil, err
}

// only reports whether p is the one Provider attached to the module.
func (m *module) only(p *Provider) bool {
	modules.Lock()
	defer modules.Unlock()
	return len(m.provs) == 1 && m.provs[0] == p
}

// userType is the user type p logs in as.
func (p *Provider) userType() uint {
	if p.cfg.UserType == 0 {
		return pkcs11.CKU_USER
	}
	return p.cfg.UserType
}

// setup sets up generation gen of p in the module's current epoch: it
// finds the token, opens the session that keeps the login, shares or makes
// the token's login (module.use) and checks it. On failure it leaves
// nothing open. Called with the module busy (inModule).
func (p *Provider) setup(op string, gen uint64) (*instance, error) {
	m := p.mod
	slot, token, err := p.findToken(gen)
	if err != nil {
		return nil, err
	}
	serial := token.SerialNumber
	if p.serial != "" && serial != p.serial {
		return nil, opErr(op, gen, ErrTokenChanged, "serial %q, expected %q", serial, p.serial)
	}
	if !p.cfg.NoLogin {
		if n, lo, hi := len(p.cfg.PIN), token.MinPinLen, token.MaxPinLen; hi != 0 && hi != pkcs11.CK_UNAVAILABLE_INFORMATION && hi >= lo &&
			(uint64(n) < uint64(lo) || uint64(n) > uint64(hi)) {
			return nil, &Error{Op: "login", Generation: gen,
				Err: wrapf(ErrPIN, "the PIN has %d bytes and the token takes %d to %d; not sent, so that it costs no login attempt", n, lo, hi)}
		}
	}
	// Read-only: it only keeps the login (a write-protected token refuses
	// read-write sessions); writes open read-write sessions of their own.
	login, err := p.ctx.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION)
	if err != nil {
		return nil, p11err("open session", gen, err)
	}
	shared, err := m.use(p, login, serial, gen)
	if err != nil {
		_ = p.ctx.CloseSession(login)
		return nil, err
	}
	if !p.cfg.NoLogin {
		if err := p.checkLogin(login, serial, shared, gen); err != nil {
			m.unuse(p, login, serial, true)
			_ = p.ctx.CloseSession(login)
			return nil, err
		}
	}
	maxSessions := p.cfg.MaxSessions
	if n := token.MaxRwSessionCount; n != pkcs11.CK_UNAVAILABLE_INFORMATION && n != pkcs11.CK_EFFECTIVELY_INFINITE && n > 1 && uint64(n-1) < uint64(maxSessions) {
		maxSessions = int(n - 1)
	}
	in := newInstance(p.ctx, p.fast, gen, slot, token, login, maxSessions, &p.meter)
	in.epoch = m.epoch
	return in, nil
}

// checkLogin is set-up's self-test: the session must now be a user
// session. A token whose login p shares (shared) and that lost it (it was
// removed and put back) is logged in again, once.
func (p *Provider) checkLogin(s pkcs11.SessionHandle, serial string, shared bool, gen uint64) error {
	for try := 0; ; try++ {
		si, err := p.ctx.GetSessionInfo(s)
		if err != nil {
			return p11err("login", gen, err)
		}
		if si.State == pkcs11.CKS_RW_USER_FUNCTIONS || si.State == pkcs11.CKS_RO_USER_FUNCTIONS {
			return nil
		}
		if try == 0 && shared {
			if err := p.mod.relogin(p, s, serial, gen); err != nil {
				return err
			}
			continue
		}
		return &Error{Op: "login", Generation: gen, Code: pkcs11.CKR_USER_NOT_LOGGED_IN,
			Err: fmt.Errorf("C_Login succeeded but the session is not logged in (state %d): %w", si.State, pkcs11.Error(pkcs11.CKR_USER_NOT_LOGGED_IN))}
	}
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
			return 0, pkcs11.TokenInfo{}, p11err(op, gen, tokenLoss{err}) // the module answered the slot list
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
// calls in flight, closes the Provider's sessions, logs the token out when
// no other Provider of the process uses it, and finalizes the library when
// no other Provider uses the module (the last Close of a module releases
// it for a later Open). Other Providers of the module are not disturbed.
// It returns within Config.DrainTimeout plus Config.ProbeTimeout whatever
// the HSM does: up to DrainTimeout for the calls in flight, then up to
// ProbeTimeout for C_CloseSession, C_Logout and C_Finalize (and for a
// re-initialization of the module, for other Providers, in progress).
// When calls are still inside the library after DrainTimeout (or the
// module is still busy with a re-initialization for other Providers), it
// returns an error wrapping ErrDrainTimeout; when those calls, or a
// re-initialization's C_Initialize or C_Finalize, have not returned, one
// wrapping ErrHung. Either says what was left behind: the Provider's end
// is done when those calls return; until then an Open of the module, when
// no other Provider is open on it, waits for that end within its own
// DrainTimeout plus ProbeTimeout, then fails with ErrModuleInUse. Calling
// Close again waits once more, and returns nil once all is done; after
// Close has returned nil, it always does.
//
// Close interrupts a re-initialization in progress when no other Provider
// of the module is open. When the provider has an OnStateChange callback,
// Close delivers the changes already queued, StateClosed last, and waits
// for the callback to return, within the same bound (a callback still
// running then is left to finish), except when Close is called from
// inside the callback: then it returns without waiting for the callback
// (its caller), and no callback starts after that one. Safe for
// concurrent use.
func (p *Provider) Close() error {
	start := time.Now()
	p.stopBackground() // stops the monitor
	gen, from, first := p.closeState()
	if first {
		p.closedFrom, p.closedGen = from, gen
		if in := p.inst.Load(); in != nil {
			in.stop()
		}
		p.mod.closed() // the last open Provider interrupts a re-initialization
		go p.finish()
	}
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
	const released = "the Provider's end is done when they return (until then, when no other Provider is open on the module, Open of it fails with ErrModuleInUse)"
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
	if p.mod.call.Load() == nil {
		// Nothing hangs: the module's life is held, by a re-initialization
		// for other Providers (draining them) or an Open.
		return &Error{Op: "close", Generation: gen,
			Err: wrapf(ErrDrainTimeout, "the module is busy with a re-initialization or an Open for other Providers; %s", strings.Replace(released, "they return", "it ends", 1))}
	}
	return &Error{Op: "close", Generation: gen,
		Err: wrapf(ErrHung, "%s has not returned; %s", p.mod.stuckCall("a life cycle call"), strings.Replace(released, "they return", "it does", 1))}
}

// finish ends the provider's use of the module once nothing is inside it:
// it waits for the operations in flight, for a re-initialization or Open
// of the module in progress and for a life cycle call that has not
// returned; then it ends the Provider's use of its token (module.unuse:
// C_Logout when no other Provider uses it), closes its sessions unless the
// module is to be finalized, and finalizes the library when no other
// Provider is attached; it detaches the Provider and closes p.finished. It
// runs in a goroutine of its own, started once, by Close or by an Open
// whose calls did not return, and waits as long as the module keeps those
// calls.
//
// Sessions are closed by their numbers only when Close found the Provider
// healthy, or a re-initialization of the module set them up after Close:
// a token that went away took its sessions with it, and the library may
// have given the same numbers to sessions of other Providers since. Those
// of an unhealthy Provider are left to the next C_Finalize.
func (p *Provider) finish() {
	m := p.mod
	_ = p.gate.drain(context.Background(), nil)
	close(p.drained)
	m.life <- struct{}{}
	m.busy <- struct{}{}
	m.call.Store(&moduleCall{what: "C_Logout and C_Finalize of Close", since: time.Now()})
	last := m.only(p)
	if in := p.inst.Load(); in != nil && m.initialized && in.epoch == m.epoch {
		// Its sessions are known good when Close found it healthy, or
		// when a re-initialization set them up after Close.
		good := p.closedFrom == StateHealthy || in.gen > p.closedGen
		m.unuse(p, in.login, in.token.SerialNumber, good)
		if good && !last {
			in.closeSessions()
		}
	}
	if last {
		m.finalize(p.log.Warn)
	}
	p.inst.Store(nil)
	m.detach(p)
	m.call.Store(nil)
	<-m.busy
	m.unlock()
	close(p.finished)
}
