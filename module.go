package hsm

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/miekg/pkcs11"
	"golang.org/x/sync/singleflight"
)

// Modules are loaded once per process and never unloaded: a dlclose'd
// miekg/pkcs11 context crashes on use, a finalized one only returns
// CKR_CRYPTOKI_NOT_INITIALIZED.
var modules = struct {
	sync.Mutex
	m map[string]*module
}{m: map[string]*module{}}

// module is one PKCS#11 module of the process, shared by every Provider
// opened on it: one per token, or several of one token. It is the unit of
// C_Initialize and C_Finalize, as the standard makes it: a
// re-initialization, whichever Provider asks for it or starts it, drains
// the calls of every Provider of the module, finalizes and initializes
// once, logs every token in again and moves every Provider to its next
// generation. The last Provider to finish finalizes it.
type module struct {
	path string
	ctx  *pkcs11.Ctx
	// fast is the module's function list for two-call signatures and
	// decryptions (see fastsign.go), or nil with slow saying why.
	fast unsafe.Pointer
	slow string

	// Guarded by modules.Mutex.
	//
	// provs are the Providers attached to the module: from Open until
	// their finish has run. open counts those not closed. stop is closed
	// when open drops to 0: it interrupts a re-initialization's waits, as
	// no open Provider is left to need it. initText is Config.InitArgs of
	// the Providers attached (they must agree).
	provs    []*Provider
	open     int
	stop     chan struct{}
	initText string

	// life serializes what moves the module's life cycle or a Provider's
	// generation: an Open's set-up, a re-initialization (of the module, or
	// of one Provider's token), the end of a Provider (finish). A channel,
	// so that every wait for it is bounded.
	life chan struct{}

	// busy holds a value while a goroutine is inside the module's life
	// cycle calls (C_Initialize to C_Login, C_Finalize, C_Logout,
	// C_CloseSession of a closing Provider), which inModule bounds. A
	// call that outlives its bound keeps busy until it returns, and no
	// other life cycle call starts until then.
	busy chan struct{}
	// call describes the life cycle call in progress, for errors; nil
	// when none is.
	call atomic.Pointer[moduleCall]

	// Guarded by busy.
	//
	// initialized says whether C_Initialize has been called without a
	// matching C_Finalize; epoch counts the successful C_Initialize calls
	// (an instance belongs to the epoch it was set up in: its handles
	// are junk in any other). initArgs is initText in C memory, or nil,
	// freed after the C_Finalize of the last Provider. tokens are the
	// tokens in use in this epoch, by serial number; refused the PINs a
	// token refused in it (see login).
	initialized bool
	epoch       uint64
	initArgs    unsafe.Pointer
	tokens      map[string]*tokenUse
	refused     map[[32]byte]error

	// flights shares one re-initialization among its callers, whichever
	// Provider they come from.
	flights singleflight.Group
	// genSem holds one GenerateKey at a time in the module, so that its
	// check for a free label holds across Providers of one token.
	genSem chan struct{}
}

// tokenUse is the use of one token by the Providers of one epoch, and its
// login, which PKCS#11 shares among every session of the application: the
// first Provider of the token that logs in does, the others on the same PIN
// and user type share it, and the token is logged out only when no
// Provider uses it any more.
type tokenUse struct {
	users    int  // Providers whose instance of this epoch is on the token
	loggedIn bool // this library logged the token in, in this epoch
	pin      string
	userType uint
}

// claimModule loads (once) the module at cfg.Path and attaches p to it.
func claimModule(cfg Config, p *Provider) (*module, error) {
	path := cfg.Path
	abs, err := filepath.Abs(path)
	if err == nil {
		abs, err = filepath.EvalSymlinks(abs)
	}
	if err != nil {
		return nil, causedBy(wrapf(ErrConfig, "module %q", path), err)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return nil, causedBy(wrapf(ErrConfig, "module %q", path), err)
	}
	if !fi.Mode().IsRegular() {
		return nil, wrapf(ErrConfig, "module %q is not a regular file", path)
	}
	// The last Providers of the module are closing: wait, up to
	// DrainTimeout plus ProbeTimeout (a Close's own bound), for their end
	// (their drain, C_Logout, C_Finalize), as a new Open must not
	// initialize a module they are finalizing.
	deadline := time.Now().Add(cfg.DrainTimeout + cfg.ProbeTimeout)
	modules.Lock()
	defer modules.Unlock()
	m := modules.m[abs]
	for m != nil && m.open == 0 && len(m.provs) > 0 {
		ends := make([]<-chan struct{}, 0, len(m.provs))
		for _, q := range m.provs {
			ends = append(ends, q.finished)
		}
		modules.Unlock()
		ended := waitAll(ends, deadline)
		modules.Lock()
		if !ended {
			return nil, wrapf(ErrModuleInUse, "%s is still held by a closed Provider: %s has not returned (a frozen HSM?); it is finalized and released when it does", abs, m.stuckCall("its end"))
		}
	}
	if m != nil && len(m.provs) > 0 && m.initText != cfg.InitArgs {
		return nil, wrapf(ErrConfig, "%s is initialized for other Providers with InitArgs %q, and this Config gives %q: the module takes one C_Initialize for all of them", abs, m.initText, cfg.InitArgs)
	}
	if m == nil {
		ctx := pkcs11.New(abs)
		if ctx == nil {
			return nil, wrapf(ErrConfig, "%s could not be loaded as a PKCS#11 module (not a shared library exporting C_GetFunctionList?)", abs)
		}
		m = &module{path: abs, ctx: ctx, life: make(chan struct{}, 1), busy: make(chan struct{}, 1), genSem: make(chan struct{}, 1)}
		m.fast, m.slow = fastList(ctx, abs)
		modules.m[abs] = m
	}
	if len(m.provs) == 0 {
		m.initText = cfg.InitArgs
		m.stop = make(chan struct{})
	}
	m.provs = append(m.provs, p)
	m.open++
	return m, nil
}

// waitAll waits until every channel of chs is closed, or deadline passes
// (false).
func waitAll(chs []<-chan struct{}, deadline time.Time) bool {
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	for _, ch := range chs {
		select {
		case <-ch:
		case <-t.C:
			return false
		}
	}
	return true
}

// closed records that p, attached, no longer needs the module: Close has
// begun, or Open failed. Once per Provider.
func (m *module) closed() {
	modules.Lock()
	defer modules.Unlock()
	if m.open--; m.open == 0 {
		close(m.stop)
	}
}

// detach removes p from the module, after its calls have ended and what it
// held is given back. It reports whether p was the last Provider attached.
func (m *module) detach(p *Provider) (last bool) {
	modules.Lock()
	defer modules.Unlock()
	m.provs = slices.DeleteFunc(m.provs, func(q *Provider) bool { return q == p })
	return len(m.provs) == 0
}

// attached returns the Providers attached to the module, and the channel
// that is closed when none of them is open.
func (m *module) attached() ([]*Provider, <-chan struct{}) {
	modules.Lock()
	defer modules.Unlock()
	return slices.Clone(m.provs), m.stop
}

// lock takes the module's life until deadline, or until stop is closed
// (errStopped). It returns an error naming what holds it when the
// deadline passes.
func (m *module) lock(deadline time.Time, stop <-chan struct{}) error {
	select {
	case m.life <- struct{}{}:
		return nil
	default:
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case m.life <- struct{}{}:
		return nil
	case <-stop:
		return errStopped
	case <-t.C:
		return fmt.Errorf("the module's life cycle stayed busy (%s)", m.stuckCall("another Provider's Open, re-initialization or Close"))
	}
}

func (m *module) unlock() { <-m.life }

// moduleCall is a life cycle call in progress.
type moduleCall struct {
	what  string
	since time.Time
}

// inModule runs f, PKCS#11 calls the library makes on its own to the
// module's life cycle, in a goroutine, and waits for it up to bound, or
// until stop is closed (errStopped). A call that does not return in time
// fails with ErrHung and is left to return when the module lets it; until
// then inModule fails at once with ErrHung and starts nothing, so that no
// second C_Finalize or C_Initialize enters a module that has not returned
// from the first.
func (m *module) inModule(op string, gen uint64, what string, bound time.Duration, stop <-chan struct{}, f func() error) error {
	select {
	case <-stop:
		return errStopped // Close has begun: start nothing
	default:
	}
	select {
	case m.busy <- struct{}{}:
	default:
		return m.stuckError(op, gen)
	}
	m.call.Store(&moduleCall{what: what, since: time.Now()})
	done := make(chan error, 1)
	go func() { // owned by the module: it returns when f's calls do
		err := f()
		m.call.Store(nil)
		<-m.busy
		done <- err
	}()
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case err := <-done:
		return err
	case <-t.C:
		return &Error{Op: op, Generation: gen,
			Err: wrapf(ErrHung, "%s did not return in %v (ProbeTimeout); nothing else enters the module until it does", what, bound)}
	case <-stop:
		return errStopped
	}
}

// stuckError says which life cycle call has not returned.
func (m *module) stuckError(op string, gen uint64) error {
	return &Error{Op: op, Generation: gen, Err: wrapf(ErrHung, "%s has not returned; nothing else enters the module until it does", m.stuckCall("an earlier call"))}
}

// stuckCall describes the life cycle call in progress, or returns none.
func (m *module) stuckCall(none string) string {
	if c := m.call.Load(); c != nil {
		return fmt.Sprintf("%s (%v ago)", c.what, time.Since(c.since).Round(time.Millisecond))
	}
	return none
}

// initialize calls C_Initialize and starts a new epoch: no login of the
// last one holds. Called with busy held.
func (m *module) initialize(op string, gen uint64) error {
	modules.Lock()
	text := m.initText
	modules.Unlock()
	var opts []pkcs11.InitializeOption
	if text != "" {
		m.initArgs = cString(text) // the module may keep it until C_Finalize
		opts = append(opts, pkcs11.InitializeWithReserved(m.initArgs))
	}
	if err := m.ctx.Initialize(opts...); err != nil {
		m.freeInitArgs()
		if code, _ := codeOf(err); code == pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED {
			return &Error{Op: op, Code: code, Generation: gen,
				Err: causedBy(wrapf(ErrModuleInUse, "%s was initialized by other code in this process", m.path), err)}
		}
		return p11err(op, gen, stepErr("C_Initialize", err))
	}
	m.initialized = true
	m.epoch++
	m.tokens = map[string]*tokenUse{}
	m.refused = map[[32]byte]error{}
	return nil
}

// finalize calls C_Finalize if the library is initialized. Called with
// busy held and nothing in flight in any Provider of the module.
func (m *module) finalize(log func(msg string, args ...any)) {
	if !m.initialized {
		return
	}
	if err := m.ctx.Finalize(); err != nil {
		log("hsm: C_Finalize failed", "module", m.path, "err", err)
	}
	m.initialized = false
	m.tokens, m.refused = nil, nil
	m.freeInitArgs()
}

// freeInitArgs frees the C copy of InitArgs, which the module keeps nothing
// of once it is finalized (or failed to initialize). Called with busy held.
func (m *module) freeInitArgs() {
	if m.initArgs != nil {
		freeC(m.initArgs)
		m.initArgs = nil
	}
}

// pinKey names a PIN of a user type for a token in refused, without
// keeping the PIN itself.
func pinKey(serial string, userType uint, pin string) [32]byte {
	return sha256.Sum256(fmt.Appendf(nil, "%d\x00%s\x00%s", userType, serial, pin))
}

// use records that p's new instance of this epoch uses the token of
// serial, and logs p's session s in unless p.cfg.NoLogin. C_Login is the
// application's, for every session of the token, so it is made once per
// token and epoch:
//   - A token this library has logged in with the same PIN and user type:
//     no call; p shares the login (set-up's self-test then checks that
//     the session is logged in, and calls C_Login when the token lost it).
//   - With another PIN or user type: refused with ErrPIN, without a call.
//     C_Login would not check the PIN of a token already logged in
//     (CKR_USER_ALREADY_LOGGED_IN), and only C_Logout, which would log
//     the other Providers out too, could make it check.
//   - A PIN the token refused in this epoch is not sent again: the same
//     error, without a call (no second Provider costs a login attempt).
//   - Otherwise C_Login. CKR_USER_ALREADY_LOGGED_IN is an error then: it
//     cannot come from a login of this library's, and a PIN not checked
//     must not open the token.
//
// Called with busy held, in set-up. On failure p does not use the token;
// on success the caller ends the use with unuse.
func (m *module) use(p *Provider, s pkcs11.SessionHandle, serial string, gen uint64) (shared bool, err error) {
	u := m.tokens[serial]
	if u == nil {
		u = &tokenUse{}
		m.tokens[serial] = u
	}
	if !p.cfg.NoLogin {
		userType := p.userType()
		if u.loggedIn {
			if u.userType != userType || subtle.ConstantTimeCompare([]byte(u.pin), []byte(p.cfg.PIN)) != 1 {
				return false, &Error{Op: "login", Generation: gen,
					Err: wrapf(ErrPIN, "token %q is logged in by another Provider of this process with another PIN or user type; not sent, so that it costs no login attempt and logs no one out: Providers of one token share its login and must use one PIN", serial)}
			}
			shared = true
		} else if err := m.login(p, s, u, serial, userType, gen); err != nil {
			return false, err
		}
	}
	u.users++
	return shared, nil
}

// login calls C_Login for use. Called with busy held.
func (m *module) login(p *Provider, s pkcs11.SessionHandle, u *tokenUse, serial string, userType uint, gen uint64) error {
	key := pinKey(serial, userType, p.cfg.PIN)
	if err := m.refused[key]; err != nil {
		return err
	}
	if err := m.ctx.Login(s, userType, p.cfg.PIN); err != nil {
		code, _ := codeOf(err)
		if code == pkcs11.CKR_USER_ALREADY_LOGGED_IN || code == pkcs11.CKR_USER_ANOTHER_ALREADY_LOGGED_IN {
			return &Error{Op: "login", Code: code, Generation: gen,
				Err: fmt.Errorf("token %q was already logged in, not by this library: its PIN was not checked: %w", serial, err)}
		}
		e := p11err("login", gen, err)
		if isPINCode(code) {
			m.refused[key] = e
		}
		return e
	}
	u.loggedIn, u.pin, u.userType = true, p.cfg.PIN, userType
	return nil
}

// relogin logs in again a token that this library logged in during this
// epoch and that lost the login (set-up's self-test found the session not
// logged in). Called with busy held.
func (m *module) relogin(p *Provider, s pkcs11.SessionHandle, serial string, gen uint64) error {
	u := m.tokens[serial]
	if u == nil || !u.loggedIn {
		return nil
	}
	u.loggedIn = false
	return m.login(p, s, u, serial, p.userType(), gen)
}

// unuse ends a use of the token of serial in this epoch. The last one logs
// the token out with session s when this library logged it in, and when
// logout says so: false for a Provider whose token went away (its sessions
// may be gone, and a login that survived is the next set-up's to share).
// Called with busy held.
func (m *module) unuse(p *Provider, s pkcs11.SessionHandle, serial string, logout bool) {
	u := m.tokens[serial]
	if u == nil {
		return
	}
	if u.users--; u.users > 0 || !logout {
		return
	}
	delete(m.tokens, serial)
	if u.loggedIn {
		if err := m.ctx.Logout(s); err != nil {
			p.log.Debug("hsm: C_Logout failed", "module", m.path, "token", serial, "err", err)
		}
	}
}
