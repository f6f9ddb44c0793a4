package hsm

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/miekg/pkcs11"
)

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
		return "", nil, causedBy(wrapf(ErrConfig, "module %q", path), err)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return "", nil, causedBy(wrapf(ErrConfig, "module %q", path), err)
	}
	if !fi.Mode().IsRegular() {
		return "", nil, wrapf(ErrConfig, "module %q is not a regular file", path)
	}
	modules.Lock()
	defer modules.Unlock()
	m := modules.m[abs]
	switch {
	case m != nil && m.owned && m.closing:
		return "", nil, wrapf(ErrModuleInUse, "%s is still held by a closed Provider: PKCS#11 calls of it have not returned (a frozen HSM); it is finalized and released when they do", abs)
	case m != nil && m.owned:
		return "", nil, wrapf(ErrModuleInUse, "%s is owned by another open Provider", abs)
	}
	if m == nil {
		ctx := pkcs11.New(abs)
		if ctx == nil {
			return "", nil, wrapf(ErrConfig, "%s could not be loaded as a PKCS#11 module (not a shared library exporting C_GetFunctionList?)", abs)
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
			Err: wrapf(ErrHung, "%s did not return in %v (ProbeTimeout); nothing else enters the module until it does", what, p.cfg.ProbeTimeout)}
	case <-stop:
		return errStopped
	}
}

// stuckError says which life cycle call has not returned.
func (p *Provider) stuckError(op string, gen uint64) error {
	return &Error{Op: op, Generation: gen, Err: wrapf(ErrHung, "%s has not returned; nothing else enters the module until it does", p.stuckCall("an earlier call"))}
}

// stuckCall describes the life cycle call in progress, or returns none.
func (p *Provider) stuckCall(none string) string {
	if c := p.modCall.Load(); c != nil {
		return fmt.Sprintf("%s (%v ago)", c.what, time.Since(c.since).Round(time.Millisecond))
	}
	return none
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
